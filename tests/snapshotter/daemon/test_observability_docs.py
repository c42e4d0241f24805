"""docs/observability.md lists exactly the metric families, fallback reasons and log events the
code has: the doc is what dashboards and alerts are written against."""

from __future__ import annotations

import json
import re
from pathlib import Path

from grpc import StatusCode

from fusefs import FsSnapshot, LayerMeters, LayerSnapshot
from fusefs.cache import CacheUsage
from fusefs.stats import FETCH_KINDS
from registry import RegistryStats
from snapshotter.daemon import index_publish
from snapshotter.daemon.grpc_metrics import GrpcStats
from snapshotter.daemon.metrics import DaemonCollector, DaemonSnapshot
from snapshotter.remote import fallback

REPO = Path(__file__).resolve().parents[3]
DOC = (REPO / "docs" / "observability.md").read_text()


def _section(title: str) -> str:
    return DOC.split(f"\n{title}\n", 1)[1].split("\n#", 1)[0]


def _first_column(section: str) -> set[str]:
    """The backquoted names in the first column of a section's table."""
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_0-9]+)`", line.split(" | ")[0]))
    return names


def test_every_log_event_in_the_code_is_documented_and_no_other() -> None:
    found = {
        match
        for package in ("fusefs", "registry", "snapshotter")
        for path in (REPO / package).rglob("*.py")
        for match in re.findall(r'"event": "([a-z_]+)"', path.read_text())
    }
    assert found  # the pattern still matches how the code writes events
    assert _first_column(_section("## Log events")) == found


def test_every_fallback_reason_is_documented_and_no_other() -> None:
    assert _first_column(_section("### Fallback reasons")) == set(fallback.REASONS)


def test_every_index_publish_reason_is_documented_and_no_other() -> None:
    documented = _first_column(_section("### Index publish reasons"))
    assert documented == set(index_publish.FAILURE_REASONS) | set(index_publish.SKIP_REASONS)


def test_every_exported_family_is_documented_and_no_other() -> None:
    meters = LayerMeters()
    layer = LayerSnapshot("r1", "sha256:" + "a" * 64, 10, 5, meters)
    grpc = GrpcStats()
    grpc.observe("/m", StatusCode.OK, 0.01)
    snapshot = DaemonSnapshot(
        "1", lazy=True,
        fs=FsSnapshot([layer], LayerMeters(), 0, 0, CacheUsage(0, 0, 1, 0, 0, 0, 0, 0)),
        registry=RegistryStats(), fallbacks=dict.fromkeys(fallback.REASONS, 0),
        grpc=grpc.snapshot(), index_publish=dict.fromkeys(index_publish.RESULTS, 0),
    )
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in DaemonCollector(lambda: snapshot, per_layer=True).collect()
    }
    documented = {name for name in _first_column(_section("### Families"))
                  if name.startswith("lazysnap_")}
    assert documented == exported


def test_the_documented_fetch_kinds_are_the_counted_ones() -> None:
    kinds_line = next(line for line in _section("### Labels and cardinality").splitlines()
                      if line.startswith("| `kind` (fetched bytes)"))
    values = kinds_line.split(" | ")[1]
    assert set(re.findall(r"`([a-z_]+)` \(", values)) == set(FETCH_KINDS)


def test_the_grafana_dashboard_queries_only_documented_families() -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    documented = _first_column(_section("### Families"))
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:lazysnap|process)_[a-z_]+)", target["expr"])
    }
    assert used
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in documented or base in documented, name
