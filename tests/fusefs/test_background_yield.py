"""Background fetch soon after a reader waited: ``yield_depth`` small ranges on the link for all
layers (``background_yield``), so a program pausing between misses finds the link nearly free;
and a range leaves the link once its bytes are in, before they are decoded."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fusefs.background import cut_range, fetch_everything, fetch_missing
from fusefs.fetcher import ChunkFetcher
from fusefs.index import ChunkRef, Codec
from fusefs.layer import Layer
from fusefs.ranges import split_blob
from tests.fusefs.test_fetcher import fetcher_for, small_files
from tests.integration.fuse_support import FakeBlob, FakeIndex, fake_decoder, trio_test

KiB = 1024


class _SlowBlob(FakeBlob):
    """A blob whose requests take ``delay`` seconds, counting how many are in flight."""

    def __init__(self, data: bytes, delay: float) -> None:
        super().__init__(data)
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.log: list[tuple[float, int]] = []  # (start time, length) of each request

    async def read_at(self, offset: int, length: int) -> bytes:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.log.append((trio.current_time(), length))
        try:
            await trio.sleep(self.delay)
            return await super().read_at(offset, length)
        finally:
            self.in_flight -= 1


async def _a_reader_waits(fetcher: ChunkFetcher, layer: Layer, index: FakeIndex) -> None:
    """A reader's miss: it waits on the link, which starts the yield time."""
    entry = index.by_path["d/f0"]
    assert await fetcher.read(layer, entry, 0, 100) == index._nodes[entry].content[:100]


_SETTINGS = {
    "background_range": 100 * KiB,
    "background_concurrency": 4,
    "first_read_grace": 0,
    "quiet_period": 0.05,
    "yield_range": 30 * KiB,
    "ondemand_range": 8 * KiB,
    "max_gap": 0,
    "directory_misses": 10**6,
}


@contextlib.asynccontextmanager
async def _forty_small_files(
    tmp_path: Path, *, delay: float = 0.01, trusted: bool = True, **settings: float
) -> AsyncIterator[tuple[ChunkFetcher, Layer, FakeIndex, _SlowBlob]]:
    """A layer of 40 files of 20 KB (a chunk each) on a slow blob, with ``_SETTINGS`` and
    ``settings`` over them; ``trusted``: the TOC's chunk digests prove the blob."""
    index = FakeIndex(small_files(40, 20_000), toc_trusted=trusted)
    blob = _SlowBlob(index.blob_bytes, delay=delay)
    async with fetcher_for(tmp_path, index, blob, **{**_SETTINGS, **settings}) as (
        fetcher, layer, _
    ):
        yield fetcher, layer, index, blob


@pytest.mark.parametrize("yield_depth", [1, 2])
@trio_test
async def test_soon_after_a_reader_background_keeps_yield_depth_small_ranges_in_flight(
    tmp_path: Path, yield_depth: int,
) -> None:
    async with _forty_small_files(
        tmp_path, background_yield=60, yield_depth=yield_depth
    ) as (fetcher, layer, index, blob):
        await _a_reader_waits(fetcher, layer, index)
        reader_requests = len(blob.log)
        blob.most_in_flight = 0
        await fetch_missing(fetcher, layer)
        assert layer.stats.blob_verified is True
        background = [length for _, length in blob.log[reader_requests:]]
        # Old code: four 100 KiB ranges at once once the reader was quiet for 0.05 s; before
        # yield_depth, one range at a time, the link idle for a round trip between two.
        assert blob.most_in_flight == yield_depth
        assert background and max(background) <= 30 * KiB
        for i in range(40):
            entry = index.by_path[f"d/f{i}"]
            assert await fetcher.read(layer, entry, 0, 20_000) == index._nodes[entry].content


@trio_test
async def test_a_background_range_leaves_the_link_before_its_bytes_are_decoded(
    tmp_path: Path,
) -> None:
    """While one range's chunks are decoded (on a worker thread), the next range is already
    requested: the link does not wait for the daemon's work on the last bytes."""
    index = FakeIndex(small_files(8, 20_000), toc_trusted=True)
    next_request = threading.Event()  # a second background request has started
    requests = 0

    class _Watching(_SlowBlob):
        async def read_at(self, offset: int, length: int) -> bytes:
            nonlocal requests
            requests += 1
            if requests == 2:
                next_request.set()
            return await super().read_at(offset, length)

    decodes_saw_the_next_request: list[bool] = []

    def decoder(codec: Codec, raw: bytes, ref: ChunkRef) -> bytes:
        if not decodes_saw_the_next_request:  # the first range's decode waits for the next one
            decodes_saw_the_next_request.append(next_request.wait(timeout=2.0))
        return fake_decoder(codec, raw, ref)

    blob = _Watching(index.blob_bytes, delay=0.01)
    settings = {**_SETTINGS, "background_concurrency": 1, "background_range": 20_000}
    async with fetcher_for(tmp_path, index, blob, background_yield=0, **settings) as (
        fetcher, layer, _
    ):
        fetcher.flights._decode = decoder
        await fetch_missing(fetcher, layer)
        assert layer.stats.blob_verified is True
        # Old code: a range held its place on the link until its chunks were decoded, so the
        # next request waited for the decode, which waited for it in vain.
        assert decodes_saw_the_next_request == [True]
        for i in range(8):
            entry = index.by_path[f"d/f{i}"]
            assert await fetcher.read(layer, entry, 0, 20_000) == index._nodes[entry].content


@trio_test
async def test_background_is_back_to_full_ranges_once_the_yield_is_over(tmp_path: Path) -> None:
    async with _forty_small_files(tmp_path, delay=0.02, background_yield=0.3) as (
        fetcher, layer, index, blob
    ):
        await _a_reader_waits(fetcher, layer, index)
        reader_done = trio.current_time()
        reader_requests = len(blob.log)
        await fetch_missing(fetcher, layer)
        assert layer.stats.blob_verified is True
        background = blob.log[reader_requests:]
        first_full = next(
            number for number, (_, length) in enumerate(background) if length > 30 * KiB
        )
        assert first_full >= 3  # small ranges one at a time first
        assert background[first_full][0] >= reader_done + 0.29  # full ones once it is over
        assert blob.most_in_flight > 1


@trio_test
async def test_without_a_reader_background_starts_at_full_concurrency(tmp_path: Path) -> None:
    async with _forty_small_files(tmp_path, background_yield=60) as (fetcher, layer, _, blob):
        await fetch_missing(fetcher, layer)
        assert layer.stats.blob_verified is True
        assert blob.most_in_flight > 1 and max(length for _, length in blob.log) > 30 * KiB


@trio_test
async def test_yield_off_restores_full_concurrency_after_the_quiet_period(tmp_path: Path) -> None:
    async with _forty_small_files(tmp_path, background_yield=0) as (
        fetcher, layer, index, blob
    ):
        await _a_reader_waits(fetcher, layer, index)
        await fetch_missing(fetcher, layer)
        assert blob.most_in_flight > 1


@trio_test
async def test_the_whole_blob_check_keeps_its_ranges_one_at_a_time_after_a_reader(
    tmp_path: Path,
) -> None:
    # Untrusted: the whole blob is hashed.
    async with _forty_small_files(
        tmp_path, trusted=False, background_yield=60, yield_depth=1
    ) as (fetcher, layer, index, blob):
        await _a_reader_waits(fetcher, layer, index)
        blob.most_in_flight = 0
        await fetch_everything(fetcher, layer)
        assert layer.stats.blob_verified is True
        assert blob.most_in_flight == 1  # old code: four ranges at once


@trio_test
async def test_two_layers_share_the_yield_ranges(tmp_path: Path) -> None:
    index = FakeIndex(small_files(30, 20_000), toc_trusted=True)
    blob = _SlowBlob(index.blob_bytes, delay=0.01)
    async with fetcher_for(
        tmp_path, index, blob, background_yield=60, yield_depth=2, **_SETTINGS
    ) as (fetcher, layer, _):
        other_index = FakeIndex(small_files(30, 20_000), toc_trusted=True)
        other_blob = _SlowBlob(other_index.blob_bytes, delay=0.01)
        other = Layer("l2", 2, other_blob, other_index)
        await _a_reader_waits(fetcher, layer, index)
        blob.most_in_flight = 0
        in_flight_together = 0

        async def watch() -> None:
            nonlocal in_flight_together
            while True:
                in_flight_together = max(
                    in_flight_together, blob.in_flight + other_blob.in_flight
                )
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as both:
                both.start_soon(fetch_missing, fetcher, layer)
                both.start_soon(fetch_missing, fetcher, other)
            nursery.cancel_scope.cancel()
        assert layer.stats.blob_verified and other.stats.blob_verified
        assert in_flight_together == 2


def test_cut_range_keeps_whole_chunks_and_at_least_one() -> None:
    index = FakeIndex(small_files(6, 20_000), toc_trusted=True)
    layer = Layer("l1", 1, FakeBlob(index.blob_bytes), index)
    whole = next(split_blob(layer.all_chunks(), blob_size=layer.blob.size, range_size=1 << 30))
    assert cut_range(whole, None) == (whole, None)
    head, rest = cut_range(whole, 45_000)
    assert rest is not None
    assert len(head.chunks) == 2 and head.end - head.start <= 45_000
    assert head.chunks + rest.chunks == whole.chunks and rest.end == whole.end
    tiny, rest = cut_range(whole, 10)  # smaller than a chunk: still one chunk
    assert len(tiny.chunks) == 1 and rest is not None


@trio_test
async def test_a_reader_hitting_the_disk_cache_does_not_hold_background_fetch_back(
    tmp_path: Path,
) -> None:
    """Read-everything reads, on and on, what background fetch brought into the disk cache.
    Those reads never wait on the link, so background fetch goes on meanwhile."""
    # hot_bytes 0: every hit is a disk hit.
    async with _forty_small_files(
        tmp_path, background_yield=0, long_read=1000.0, hot_bytes=0
    ) as (fetcher, layer, index, _):
        await _a_reader_waits(fetcher, layer, index)
        await fetcher.writes_done()
        entry = index.by_path["d/f0"]
        assert fetcher.flights.in_memory(next(iter(fetcher.cache._entries))) is None
        background_done_at = None

        async def background() -> None:
            nonlocal background_done_at
            await fetch_missing(fetcher, layer)
            background_done_at = trio.current_time()

        reading_until = trio.current_time() + 2.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(background)
            while trio.current_time() < reading_until:  # a reader busy on cached bytes
                assert await fetcher.read(layer, entry, 0, 100) == index._nodes[entry].content[:100]
                await trio.sleep(0.001)
        assert layer.stats.blob_verified is True
        # Old code: every disk hit counted as a wait, so background fetch never had its quiet
        # time and only ran once the reader stopped.
        assert background_done_at is not None and background_done_at < reading_until - 1.0
