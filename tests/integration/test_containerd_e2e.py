"""A real containerd 1.6 pulls and runs an image through lazysnap (proxy plugin over gRPC)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from snapshotter._proto import snapshots_pb2
from snapshotter.labels import MAX_LABEL_BYTES
from tests.integration.conftest import PushedImage
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon

T = TypeVar("T")

pytestmark = [pytest.mark.root, pytest.mark.containerd, pytest.mark.registry, pytest.mark.slow]


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    with running_daemon(short_tmp / "d") as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        yield daemon, containerd


def _pull(containerd: RunningContainerd, image: PushedImage) -> None:
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "lazysnap", image.reference)


def _run(containerd: RunningContainerd, image: PushedImage, name: str, *cmd: str) -> str:
    result = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", image.reference, name, *cmd)
    return result.stdout


def _ctr_snapshots(containerd: RunningContainerd, *args: str) -> str:
    return containerd.ctr("snapshots", "--snapshotter", "lazysnap", *args).stdout


def _daemon_names(daemon: Daemon) -> dict[str, snapshots_pb2.Info]:
    with daemon.snapshots() as stub:
        infos = [i for reply in stub.List(snapshots_pb2.ListSnapshotsRequest()) for i in reply.info]
    return {info.name: info for info in infos}


def _wait_for(
    probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0
) -> T:
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = probe()
    return value


def _wait_until_containerd_reconnects(containerd: RunningContainerd) -> None:
    """containerd redials a restarted proxy with gRPC backoff (at most 3 s between tries)."""
    ok = _wait_for(
        lambda: containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls", check=False),
        lambda result: result.returncode == 0,
    )
    assert ok.returncode == 0, ok.stderr


def test_pull_and_run_through_lazysnap(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    daemon, containerd = stack
    _pull(containerd, busybox_image)
    # The second layer's file is visible through the overlay of both layers.
    assert _run(containerd, busybox_image, "c1", "/bin/cat", "/etc/hello") == "hello from layer two\n"
    assert _run(containerd, busybox_image, "c2", "/bin/echo", "hi", "there") == "hi there\n"

    # ctr's view (containerd's metadata) and the daemon's own database agree.
    lines = _ctr_snapshots(containerd, "ls").splitlines()[1:]
    ctr_rows = {line.split()[0]: line.split()[-1] for line in lines if line.strip()}
    assert len(ctr_rows) == 2 and set(ctr_rows.values()) == {"Committed"}
    # `ctr run --rm` deleted the containers' active snapshots in containerd's metadata; its
    # garbage collector then removes them from the backend, asynchronously.
    backend = _wait_for(lambda: _daemon_names(daemon), lambda names: len(names) == 2)
    assert {info.kind for info in backend.values()} == {snapshots_pb2.COMMITTED}
    for chain_id in ctr_rows:
        # containerd namespaces backend names as "<ns>/<seq>/<name>"
        assert any(name.endswith("/" + chain_id) for name in backend), chain_id


def test_ctr_snapshots_info_usage_rm_agree_with_daemon(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    daemon, containerd = stack
    _pull(containerd, busybox_image)
    lines = _ctr_snapshots(containerd, "ls").splitlines()[1:]
    rows = [line.split() for line in lines if line.strip()]
    top = next(row[0] for row in rows if len(row) == 3)  # the one with a parent
    base = next(row[0] for row in rows if len(row) == 2)

    info = json.loads(_ctr_snapshots(containerd, "info", top))
    assert info["Kind"] == "Committed" and info["Parent"] == base

    usage_lines = _ctr_snapshots(containerd, "usage", base).splitlines()
    assert usage_lines[0].split()[:3] == ["KEY", "SIZE", "INODES"]
    base_row = usage_lines[1].split()
    # busybox is ~1.9 MiB; ctr prints a human size like "1.9 MiB".
    assert base_row[0] == base and "MiB" in base_row[2] and int(base_row[-1]) >= 10

    # Removing the base while it has a child fails; the leaf can be removed, then the base.
    refused = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "rm", base, check=False)
    assert refused.returncode != 0 and "remove" in refused.stderr.lower()
    _ctr_snapshots(containerd, "rm", top)
    # With its child gone nothing references the base, so containerd's GC may take it first.
    second = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "rm", base, check=False)
    assert second.returncode == 0 or "not found" in second.stderr, second.stderr
    # containerd forgets them at once; its garbage collector then removes them from lazysnap.
    assert _wait_for(lambda: _daemon_names(daemon), lambda names: not names) == {}


def test_daemon_restart_keeps_snapshots_and_image_runs(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    daemon, containerd = stack
    _pull(containerd, busybox_image)
    before = _daemon_names(daemon)
    assert daemon.stop() == 0
    daemon.start()
    _wait_until_containerd_reconnects(containerd)
    after = _daemon_names(daemon)
    assert {n: (i.kind, i.parent, dict(i.labels)) for n, i in before.items()} == {
        n: (i.kind, i.parent, dict(i.labels)) for n, i in after.items()
    }
    # containerd reconnects to the restarted proxy by itself.
    assert _run(containerd, busybox_image, "c3", "/bin/cat", "/etc/hello") == "hello from layer two\n"


def test_kill9_between_pull_and_run(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    daemon, containerd = stack
    _pull(containerd, busybox_image)
    daemon.kill9()
    daemon.start()
    _wait_until_containerd_reconnects(containerd)
    assert _run(containerd, busybox_image, "c4", "/bin/sh", "-c", "echo $((6*7))") == "42\n"


def test_garbage_collection_walks_snapshots_with_large_labels(
    stack: tuple[Daemon, RunningContainerd],
) -> None:
    # containerd's GC lists the proxy's snapshots with a 16 MiB message limit and removes those
    # it does not know. 120 of them with 42 near-limit labels each: 100 encode to over 17 MB.
    daemon, containerd = stack
    value = "v" * (MAX_LABEL_BYTES - 8)
    labels = {f"big-{n:03d}": value for n in range(42)}
    with daemon.snapshots() as stub:
        for i in range(120):
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key=f"orphan-{i:03d}", labels=labels))
    # A removal makes containerd collect this snapshotter; removing a lease with --sync runs
    # the collection at once.
    _ctr_snapshots(containerd, "prepare", "marks-lazysnap-dirty")
    _ctr_snapshots(containerd, "rm", "marks-lazysnap-dirty")
    lease = containerd.ctr("leases", "create").stdout.split()[0]
    collected = containerd.ctr("leases", "rm", "--sync", lease, check=False)
    assert collected.returncode == 0, collected.stderr
    # Before List was cut by size: "snapshot garbage collection failed ... larger than max".
    assert "snapshot garbage collection failed" not in containerd.log()
    left = _wait_for(lambda: set(_daemon_names(daemon)), lambda names: not names)
    assert len(left) == 0
