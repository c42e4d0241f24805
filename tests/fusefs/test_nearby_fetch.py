"""Nearby fetch: a read miss close to a recent one in the layer's blob fetches the small files
around the two, and leaves far misses, large files and zTOC layers alone."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from fusefs.fetcher import ChunkFetcher
from fusefs.index import EntryKind
from fusefs.layer import Layer
from tests.fusefs.test_fetcher import fetcher_for, small_files
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, trio_test

KiB = 1024

_SETTINGS = {
    "ondemand_range": 8 * KiB,
    "max_gap": 0,
    "directory_misses": 10**6,  # one directory: nearby fetch alone
    "first_read_grace": 3600,
    "nearby_span": 64 * KiB,
    "nearby_fetch_max": 1 << 20,
}


async def _read(fetcher: ChunkFetcher, layer: Layer, index: FakeIndex, path: str) -> None:
    entry = index.by_path[path]
    assert await fetcher.read(layer, entry, 0, 10_000) == index._nodes[entry].content


async def _settle(fetcher: ChunkFetcher) -> None:
    with trio.fail_after(10):
        await trio.sleep(0.01)
        while fetcher.flights.in_flight:
            await trio.sleep(0.01)


@trio_test
async def test_a_miss_near_a_recent_one_fetches_the_small_files_around(tmp_path: Path) -> None:
    index = FakeIndex(small_files(60, 3000))  # about 3 KB of blob per file
    async with fetcher_for(tmp_path, index, **_SETTINGS) as (fetcher, layer, blob):
        await _read(fetcher, layer, index, "d/f30")
        await _read(fetcher, layer, index, "d/f20")  # backward: no walk, but close
        await _settle(fetcher)
        before = len(blob.requests)
        for name in ("d/f12", "d/f25", "d/f35", "d/f40"):
            await _read(fetcher, layer, index, name)
        # Old code: four more misses, a round trip each.
        assert len(blob.requests) == before
        assert max(length for _, length in blob.requests) <= 8 * KiB + 3100  # short ranges


@trio_test
async def test_far_misses_fetch_nothing_around(tmp_path: Path) -> None:
    index = FakeIndex(small_files(60, 3000))
    settings = {**_SETTINGS, "nearby_span": 16 * KiB}
    async with fetcher_for(tmp_path, index, **settings) as (fetcher, layer, blob):
        for name in ("d/f0", "d/f30", "d/f59"):
            await _read(fetcher, layer, index, name)
        await _settle(fetcher)
        assert fetcher._policy.nearby.started == 0
        assert len(blob.requests) == 3


@trio_test
async def test_nearby_fetch_leaves_large_files_and_keeps_to_its_budget(tmp_path: Path) -> None:
    entries = [FakeEntry("d", kind=EntryKind.DIR, perm=0o755)]
    for i in range(40):
        size = 100 * KiB if i % 2 else 3000  # odd files are large (over 2 x ondemand_range)
        entries.append(FakeEntry(f"d/f{i}", content=os.urandom(size)))
    index = FakeIndex(entries, chunk_size=16 * KiB)
    settings = {**_SETTINGS, "nearby_span": 400 * KiB, "nearby_fetch_max": 9000}
    async with fetcher_for(tmp_path, index, **settings) as (fetcher, layer, blob):
        await _read(fetcher, layer, index, "d/f20")
        await _read(fetcher, layer, index, "d/f18")
        await _settle(fetcher)
        assert fetcher._policy.nearby.started == 1
        reader_bytes = sum(length for _, length in blob.requests[:2])
        nearby = sum(length for _, length in blob.requests[2:])
        assert reader_bytes < 8 * KiB  # each miss fetched its small file alone
        assert 0 < nearby <= 9000  # the nearest small files, within the budget
        for i in range(1, 40, 2):  # no chunk of a large file
            for ref in index.chunks(index.by_path[f"d/f{i}"]):
                assert fetcher.flights.is_missing(layer, ref), i


@trio_test
async def test_nearby_span_zero_turns_it_off(tmp_path: Path) -> None:
    index = FakeIndex(small_files(60, 3000))
    settings = {**_SETTINGS, "nearby_span": 0}
    async with fetcher_for(tmp_path, index, **settings) as (fetcher, layer, blob):
        await _read(fetcher, layer, index, "d/f30")
        await _read(fetcher, layer, index, "d/f20")
        await _settle(fetcher)
        before = len(blob.requests)
        await _read(fetcher, layer, index, "d/f25")
        assert len(blob.requests) == before + 1


class _TimedBlob(FakeBlob):
    """Requests take a little while; records (start, end, offset) of each."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.spans: list[tuple[float, float, int]] = []

    async def read_at(self, offset: int, length: int) -> bytes:
        start = trio.current_time()
        await trio.sleep(0.02)
        data = await super().read_at(offset, length)
        self.spans.append((start, trio.current_time(), offset))
        return data


@trio_test
async def test_nearby_ranges_wait_for_the_miss_that_started_them(tmp_path: Path) -> None:
    # Started together, they would share the link with the reader's own range.
    index = FakeIndex(small_files(60, 3000))
    blob = _TimedBlob(index.blob_bytes)
    async with fetcher_for(tmp_path, index, blob, **_SETTINGS) as (fetcher, layer, _):
        await _read(fetcher, layer, index, "d/f30")
        await _read(fetcher, layer, index, "d/f20")
        await _settle(fetcher)
        miss = index.chunks(index.by_path["d/f20"])[0].blob_offset
        miss_end = next(end for _, end, offset in blob.spans if offset == miss)
        nearby = blob.spans[2:]
        assert nearby and all(start >= miss_end for start, _, _ in nearby)
