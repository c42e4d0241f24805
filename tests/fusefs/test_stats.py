"""The filesystem's counters: bytes fetched by kind, reads served, histogram buckets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio

from fusefs.background import run_layer_background
from fusefs.stats import BACKGROUND, ON_DEMAND, PREFETCH, Histogram, LayerMeters, fetch_kind
from tests.fusefs.test_fetcher import fetcher_for, small_files
from tests.integration.fuse_support import FakeIndex, trio_test

KiB = 1024


@trio_test
async def test_fetched_bytes_are_counted_by_kind_and_add_up_to_the_blob_requests(
    tmp_path: Path,
) -> None:
    index = FakeIndex(small_files(40, 5000), prefetch_paths=["d/f0", "d/f1"])
    async with fetcher_for(
        tmp_path, index, ondemand_range=8 * KiB, background_range=32 * KiB, max_gap=0,
        first_read_grace=0, quiet_period=0, directory_misses=10**6,
        file_completion_window=0,
    ) as (fetcher, layer, blob):
        last = index.by_path["d/f39"]
        assert await fetcher.read(layer, last, 0, 100) == index._nodes[last].content[:100]
        with trio.fail_after(10):
            while fetcher.flights.in_flight:
                await trio.sleep(0.01)
        on_demand = dict(layer.stats.meters.fetched_bytes)
        assert on_demand[ON_DEMAND] > 0
        assert on_demand[PREFETCH] == on_demand[BACKGROUND] == 0

        with trio.fail_after(20):
            await run_layer_background(fetcher, layer, background=True)
        meters = layer.stats.meters
        assert layer.stats.blob_verified
        assert meters.fetched_bytes[ON_DEMAND] == on_demand[ON_DEMAND]  # the reader's only
        assert meters.fetched_bytes[PREFETCH] > 0  # the landmark range, first
        assert meters.fetched_bytes[BACKGROUND] > 0  # the rest of the blob
        requested = sum(length for _, length in blob.requests)
        assert sum(meters.fetched_bytes.values()) == requested == layer.stats.fetched_bytes
        assert sum(meters.fetches.values()) == len(blob.requests)
        assert meters.registry_get_millis.count == len(blob.requests)
        assert meters.background_millis.count == 1


@trio_test
async def test_the_kind_reaches_the_tasks_a_task_starts() -> None:
    seen: list[str] = []

    async def fetch(meters: LayerMeters) -> None:
        meters.fetched(10, 0.001)
        seen.append("done")

    meters = LayerMeters()
    async with trio.open_nursery() as nursery:
        with fetch_kind(BACKGROUND):
            nursery.start_soon(fetch, meters)  # trio copies the context when it starts a task
        nursery.start_soon(fetch, meters)
    assert seen == ["done", "done"]
    assert meters.fetched_bytes == {ON_DEMAND: 10, PREFETCH: 0, BACKGROUND: 10}


def test_histogram_buckets_are_cumulative_and_inclusive_of_their_bound() -> None:
    histogram = Histogram((1.0, 10.0))
    for value in (0.5, 1.0, 5.0, 10.0, 11.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(1.0, 2), (10.0, 4), (float("inf"), 5)]
    assert histogram.count == 5
    assert histogram.total == 27.5


def test_meters_add_up_for_totals_that_outlive_layers() -> None:
    one, two = LayerMeters(), LayerMeters()
    one.served(100, 0.0001)
    two.served(50, 0.002)
    two.chunk_verify_failures = 2
    total = one.copy()
    total.add(two)
    assert (total.reads, total.served_bytes, total.chunk_verify_failures) == (2, 150, 2)
    assert total.read_micros.count == 2
    assert one.reads == 1  # copies are independent


def test_a_copy_of_meters_has_every_field_and_shares_nothing() -> None:
    meters = LayerMeters()
    for number, item in enumerate(dataclasses.fields(LayerMeters), start=1):
        value = getattr(meters, item.name)
        if isinstance(value, Histogram):
            value.observe(number)
        elif isinstance(value, dict):
            value[ON_DEMAND] = number
        else:
            setattr(meters, item.name, number)
    copied = meters.copy()
    for item in dataclasses.fields(LayerMeters):
        original, copy = getattr(meters, item.name), getattr(copied, item.name)
        if isinstance(original, Histogram):
            assert (copy.counts, copy.total) == (original.counts, original.total), item.name
            assert copy.counts is not original.counts
        else:
            assert copy == original, item.name
            assert not isinstance(original, dict) or copy is not original
