"""The node-wide bound on background fetch: ranges of all layers together, in attach order,
one at a time while many readers wait on the link."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs.background import fetch_missing
from fusefs.background_budget import BackgroundBudget
from fusefs.layer import Layer
from tests.fusefs.test_background_yield import _SETTINGS, _SlowBlob
from tests.fusefs.test_fetcher import fetcher_for, small_files
from tests.integration.fuse_support import FakeIndex, trio_test


class _Counted(_SlowBlob):
    """A slow blob counting requests in flight across every blob that shares ``node``."""

    def __init__(self, data: bytes, delay: float, node: dict[str, int]) -> None:
        super().__init__(data, delay)
        self.node = node

    async def read_at(self, offset: int, length: int) -> bytes:
        self.node["now"] += 1
        self.node["most"] = max(self.node["most"], self.node["now"])
        try:
            return await super().read_at(offset, length)
        finally:
            self.node["now"] -= 1


@trio_test
async def test_many_layers_hold_at_most_the_node_budget_and_go_in_attach_order(
    tmp_path: Path,
) -> None:
    node = {"now": 0, "most": 0}
    indexes = [FakeIndex(small_files(20, 20_000), toc_trusted=True) for _ in range(5)]
    blobs = [_Counted(index.blob_bytes, 0.01, node) for index in indexes]
    settings = {**_SETTINGS, "background_range": 40_000, "background_yield": 0}
    async with fetcher_for(tmp_path, indexes[0], blobs[0], background_ranges=4, **settings) as (
        fetcher, first, _
    ):
        layers = [first] + [
            Layer(f"l{n + 1}", n + 1, blob, index)
            for n, (blob, index) in enumerate(zip(blobs[1:], indexes[1:], strict=True), start=1)
        ]
        finished: dict[str, float] = {}

        async def fetch(layer: Layer) -> None:
            await fetch_missing(fetcher, layer)
            finished[layer.layer_id] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for layer in reversed(layers):  # started last-attached first: order is attach order
                nursery.start_soon(fetch, layer)
        assert all(layer.stats.blob_verified for layer in layers)
        # Old code: every layer's four ranges at once, twenty on the link.
        assert node["most"] <= 4
        # Places go to the first layer attached whenever it asks: the last one only got the
        # few it took before the others arrived while the first was fetching (old code: most
        # of its ten), and the first is done before the last.
        first_done = blobs[0].log[-1][0]
        assert len(blobs[-1].log) == 10
        assert sum(1 for started, _ in blobs[-1].log if started < first_done) <= 4
        assert finished[layers[0].layer_id] < finished[layers[-1].layer_id]
        for index, layer in zip(indexes, layers, strict=True):
            entry = index.by_path["d/f7"]
            assert await fetcher.read(layer, entry, 0, 20_000) == index._nodes[entry].content


@pytest.mark.parametrize(("readers", "most_in_flight"), [(3, 1), (2, 4)])
@trio_test
async def test_background_holds_one_range_while_many_readers_wait(
    tmp_path: Path, readers: int, most_in_flight: int,
) -> None:
    index = FakeIndex(small_files(30, 20_000), toc_trusted=True)
    blob = _SlowBlob(index.blob_bytes, delay=0.01)
    # Readers busy for long enough (long_read 0, long_read_bytes 0): the layer's own rule lets
    # background fetch run at full concurrency beside them.
    settings = {**_SETTINGS, "long_read": 0, "long_read_bytes": 0, "background_yield": 0}
    async with fetcher_for(tmp_path, index, blob, crowd_readers=3, **settings) as (
        fetcher, layer, _
    ):
        with contextlib.ExitStack() as waiting:
            for _ in range(readers):
                waiting.enter_context(fetcher.foreground())
            await fetch_missing(fetcher, layer)  # the readers waiting meanwhile
        assert layer.stats.blob_verified is True
        # Three readers crowd the node: one background range (old code: four beside them).
        # Two do not: a read-everything beside background fetch, as before.
        assert blob.most_in_flight == most_in_flight


@trio_test
async def test_the_budget_serves_the_lowest_order_first_and_returns_to_full_after_a_crowd() -> None:
    budget = BackgroundBudget(2)
    got: list[int] = []

    async def take(order: int) -> None:
        place = await budget.acquire(order)
        got.append(order)
        await trio.sleep(1)
        place.release()
        place.release()  # once only

    async with trio.open_nursery() as nursery:
        for order in (5, 3, 9, 1):
            nursery.start_soon(take, order)
            await trio.testing.wait_all_tasks_blocked()
        # 5 and 3 came first and fit; 1 and then 9 wait for them.
        assert got == [5, 3]
    assert got == [5, 3, 1, 9]
    assert budget.held == 0

    budget.crowded(trio.current_time() + 2)
    first = await budget.acquire(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(budget.acquire, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert budget.held == 1  # crowded: one place
        before = trio.current_time()
    assert trio.current_time() >= before + 1.9  # the second place came when the crowd ended
    assert budget.held == 2
    first.release()


def test_the_budget_refuses_a_limit_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BackgroundBudget(0)


@trio_test
async def test_a_layer_detached_while_waiting_for_a_place_gives_back_its_turn(
    tmp_path: Path,
) -> None:
    index = FakeIndex(small_files(20, 20_000), toc_trusted=True)
    blob = _SlowBlob(index.blob_bytes, delay=0.01)
    settings = {**_SETTINGS, "background_yield": 60, "yield_depth": 2}
    async with fetcher_for(tmp_path, index, blob, background_ranges=1, **settings) as (
        fetcher, layer, _
    ):
        with fetcher.foreground():
            pass  # a reader waited: turns are yielding turns, counted against yield_depth
        await trio.sleep(0.1)  # past the quiet period
        blocker = await fetcher.budget.acquire(-1)  # the only place, held by someone else
        with trio.move_on_after(0.5):
            await fetch_missing(fetcher, layer)  # waits for a place with its turn: detached
        blocker.release()
        assert fetcher.budget.held == 0
        # Old code without the give-back: one of the two yielding turns was lost for good.
        assert fetcher._yielding_ranges == 0
