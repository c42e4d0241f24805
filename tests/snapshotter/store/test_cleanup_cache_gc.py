"""Cleanup's route to the chunk cache: which layers it reports, and the conservative rule for
recorded layers whose chunk lists are unknown (not attached)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import trio

from snapshotter.model import Kind
from snapshotter.remote.layers import LazyLayers
from snapshotter.store.metadata import RemoteLayerRecord
from snapshotter.store.snapshots import Snapshotter
from tests.snapshotter.remote.test_hops import FakeLazyLayers, running_bridge

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


class FakeFilesystem:
    def __init__(self, attached: Iterable[str]) -> None:
        self.attached = list(attached)
        self.calls: list[tuple[list[str], bool]] = []

    def layer_ids(self) -> list[str]:
        return list(self.attached)

    async def collect_garbage(
        self, *, keep_blob_digests: Iterable[str] = (), keep_content_addressed: bool = False
    ) -> tuple[int, int]:
        self.calls.append((list(keep_blob_digests), keep_content_addressed))
        return 3, 300


def collect(
    attached: Iterable[str], recorded: Mapping[str, str], attaching: Collection[str] = ()
) -> tuple[list[str], bool]:
    fs = FakeFilesystem(attached)
    layers = LazyLayers(fs, None, lambda layer_id: Path("/nonexistent"))  # type: ignore[arg-type]
    assert trio.run(layers.collect_garbage, recorded, attaching) == (3, 300)
    assert len(fs.calls) == 1
    return fs.calls[0]


def test_every_recorded_layer_attached_keeps_nothing_extra() -> None:
    assert collect(["r1", "r2"], {"r1": D1, "r2": D2}) == ([], False)


def test_an_unattached_recorded_layer_keeps_content_addressed_chunks_and_its_blob() -> None:
    assert collect(["r1"], {"r1": D1, "r2": D2, "r3": D3}) == ([D2, D3], True)


def test_a_layer_still_reading_its_index_keeps_content_addressed_chunks() -> None:
    assert collect(["r1"], {"r1": D1}, attaching={"r9"}) == ([], True)
    # Attached already (only its row is missing): its own registrations protect its chunks.
    assert collect(["r1", "r9"], {"r1": D1}, attaching={"r9"}) == ([], False)


class FakeRemote:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[dict[str, str], set[str]]] = []
        self.fail = fail

    def collect_garbage(
        self, recorded: Mapping[str, str], attaching: Collection[str]
    ) -> tuple[int, int]:
        self.calls.append((dict(recorded), set(attaching)))
        if self.fail:
            raise RuntimeError("trio is gone")
        return 1, 10


def _record_remote(sn: Snapshotter, name: str, layer_id: str, digest: str, slot: int) -> None:
    with sn.store.transaction() as tx:
        snapshot_id = tx.insert(name, None, Kind.COMMITTED, 1, {})
        tx.insert_remote(RemoteLayerRecord(
            snapshot_id, layer_id, slot, "registry.test/x:1", digest, 100, None, {}
        ))


def test_cleanup_reports_recorded_and_attaching_layers(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root")
    try:
        remote: Any = FakeRemote()
        sn.enable_remote(remote)
        _record_remote(sn, "layer-1", "raaaa", D1, 1)
        _record_remote(sn, "layer-2", "rbbbb", D2, 2)
        sn._attaching.add("rcccc")
        orphan = sn.layout.tails / "rdddd.tail"
        orphan.write_bytes(b"x")
        # The return value still counts removed paths only: chunks are not paths.
        assert sn.cleanup() == 1
        assert remote.calls == [({"raaaa": D1, "rbbbb": D2}, {"rcccc"})]
    finally:
        sn.close()


def test_cleanup_succeeds_when_the_cache_collection_fails(tmp_path: Path) -> None:
    class FailingLayers(FakeLazyLayers):
        calls = 0

        async def collect_garbage(self, recorded: Any, attaching: Any) -> tuple[int, int]:
            FailingLayers.calls += 1
            raise RuntimeError("cache walk failed")

    sn = Snapshotter(tmp_path / "root")
    try:
        with running_bridge(FailingLayers()) as bridge:
            sn.enable_remote(bridge)
            # The bridge logs the failure; the cache is only disk space.
            assert sn.cleanup() == 0
        assert FailingLayers.calls == 1
    finally:
        sn.close()
