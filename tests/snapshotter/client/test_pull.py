"""`pull` from an in-memory registry into the in-memory containerd: documents, ranged layer
streaming, the whole-blob fallback for registries without ranges, and registry errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from registry import HostsConfig, NotFoundError
from snapshotter.client import pull as image_pull
from snapshotter.client.progress import LayerResult, PlainProgress
from snapshotter.commands._containerd_args import PlainHTTPHosts
from tests.registry.fake_registry import FakeRegistry
from tests.snapshotter.client.test_unpacker_flow import FakeContainerd, make_image, sha256
from tests.support.fake_pull import REF, pull_results, registry_with


def run_pull(registry: FakeRegistry, containerd: FakeContainerd) -> list[LayerResult]:
    return pull_results(registry, containerd, PlainProgress(io.StringIO()))


def range_requests(registry: FakeRegistry, digest: str) -> list[str]:
    return [
        r.headers.get("range", "")
        for r in registry.requests
        if r.method == "GET" and r.url.path.endswith(f"/blobs/{digest}")
    ]


def test_layers_stream_in_ranges_into_the_content_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_pull, "FETCH_RANGE", 40)
    image = make_image(2)
    registry, containerd = registry_with(image), FakeContainerd()
    results = run_pull(registry, containerd)

    assert [r.outcome for r in results] == ["applied", "applied"]
    for blob in image.blobs:
        assert containerd.content[sha256(blob)] == blob
        ranges = range_requests(registry, sha256(blob))
        assert len(ranges) == -(-len(blob) // 40) and ranges[0] == "bytes=0-39"
    assert containerd.images[str(REF)].target.digest == image.manifest_digest
    assert containerd.content[image.manifest_digest] == image.manifest_bytes
    assert containerd.open_leases == []


def test_registry_without_ranges_gets_one_whole_download() -> None:
    image = make_image(1)
    registry, containerd = registry_with(image, ranges=False), FakeContainerd()
    results = run_pull(registry, containerd)
    assert [r.outcome for r in results] == ["applied"]
    assert containerd.content[sha256(image.blobs[0])] == image.blobs[0]
    assert "" in range_requests(registry, sha256(image.blobs[0]))  # the un-ranged GET


def test_missing_layer_in_registry_fails_without_naming_the_image() -> None:
    image = make_image(2)
    registry, containerd = registry_with(image), FakeContainerd()
    del registry.blobs[sha256(image.blobs[1])]
    with pytest.raises(NotFoundError):
        run_pull(registry, containerd)
    assert containerd.images == {} and containerd.open_leases == []
    # The first layer was committed; without the lease containerd's GC will take it.
    assert list(containerd.snapshots) == [image.chains[0]]


def test_plain_http_turns_every_configured_host_to_http(tmp_path: Path) -> None:
    (tmp_path / "reg.example").mkdir()
    (tmp_path / "reg.example" / "hosts.toml").write_text(
        'server = "https://reg.example"\n[host."https://mirror.example"]\n'
    )
    hosts = PlainHTTPHosts(tmp_path).hosts_for("reg.example")
    assert [h.api_url for h in hosts] == ["http://mirror.example/v2", "http://reg.example/v2"]
    assert [h.api_url for h in HostsConfig(tmp_path).hosts_for("other.example")] == [
        "https://other.example/v2"
    ]
