"""Background fetch walks a layer's chunks once (building every ``ChunkRef`` is most of a walk's
cost), and the walk leaves the trio thread to others between ranges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fusefs.background import plan_layer, run_layer_background
from fusefs.index import ChunkRef
from fusefs.layer import ChunkTag, Layer
from tests.fusefs.test_fetcher import fetcher_for, small_files
from tests.integration.fuse_support import FakeIndex, trio_test

KiB = 1024


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The layer ids of every whole-layer walk (``Layer.all_chunks``) started."""
    started: list[str] = []
    walk = Layer.all_chunks

    def counted(self: Layer) -> Iterator[tuple[ChunkTag, ChunkRef]]:
        started.append(self.layer_id)
        return walk(self)

    monkeypatch.setattr(Layer, "all_chunks", counted)
    return started


@pytest.mark.parametrize("trusted", [True, False])
def test_background_fetch_walks_the_layer_once(
    tmp_path: Path, walks: list[str], trusted: bool
) -> None:
    @trio_test
    async def run() -> None:
        index = FakeIndex(small_files(30, 20_000), toc_trusted=trusted)
        async with fetcher_for(
            tmp_path, index, background_range=100 * KiB, first_read_grace=0
        ) as (fetcher, layer, _):
            entry = index.by_path["d/f3"]
            await fetcher.read(layer, entry, 0, 10)  # a reader fetched a chunk first
            await run_layer_background(fetcher, layer, background=True)
            assert layer.stats.blob_verified is True, layer.stats.last_error
            assert fetcher.cache.usage().chunks == 30
        # Old code, trusted: chunks_prove_blob, split_blob and fetch_rest's two passes. The
        # whole-blob check (untrusted) walked once before too, and still does.
        assert walks == ["l1"]

    run()


@trio_test
async def test_the_walk_lets_other_tasks_run_between_ranges(tmp_path: Path) -> None:
    index = FakeIndex(small_files(30, 20_000), toc_trusted=True)
    async with fetcher_for(
        tmp_path, index, background_range=40 * KiB, first_read_grace=10**6
    ) as (fetcher, layer, _):
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            before = ticks
            plan = await plan_layer(fetcher, layer)
            done = True
        assert plan.proves_blob
        assert len(plan.ranges) >= 10
        assert ticks - before >= len(plan.ranges) - 1  # the ticker ran between ranges
        assert sorted(tag for tag, _ in plan.chunks()) == sorted(
            tag for tag, ref in layer.all_chunks() if not ref.zeros
        )
