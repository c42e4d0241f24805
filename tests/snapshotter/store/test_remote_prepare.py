"""Concurrent Prepares of one lazy layer: one attach, one snapshot, every caller told it exists."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

from snapshotter.errors import AlreadyExistsError
from snapshotter.store.remote import AttachedLayer
from snapshotter.store.snapshots import Snapshotter
from tests.snapshotter.remote.test_hops import TOC, FakeLazyLayers, _labels, running_bridge


class SlowLazyLayers(FakeLazyLayers):
    async def mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        await trio.sleep(0.05)  # a registry round trip: the window the duplicates came through
        return await super().mount(labels, layer_id)


def test_concurrent_prepares_of_one_target_attach_once(tmp_path: Path) -> None:
    layers = SlowLazyLayers()
    sn = Snapshotter(tmp_path / "root")
    chain = "sha256:" + "1" * 64
    labels = _labels(chain, "sha256:" + "a" * 64, TOC)

    def prepare(i: int) -> str:
        try:
            sn.prepare(f"ns/{i}/extract {chain}", "", labels)
        except AlreadyExistsError:
            return "exists"
        return "ordinary"

    try:
        with running_bridge(layers) as bridge:
            sn.enable_remote(bridge)
            with ThreadPoolExecutor(20) as pool:
                outcomes = list(pool.map(prepare, range(20)))
        assert outcomes == ["exists"] * 20
        assert len(layers.mounted) == 1
        assert [info.name for info in sn.list()] == [chain]
    finally:
        sn.close()


@pytest.mark.parametrize("users", [1, 3])
def test_the_per_target_locks_do_not_pile_up(tmp_path: Path, users: int) -> None:
    sn = Snapshotter(tmp_path / "root")
    try:
        for _ in range(users):
            with sn._target_lock("t"):
                pass
        assert sn._target_locks == {}
    finally:
        sn.close()
