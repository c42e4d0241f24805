"""A stalled blob costs its own readers a bounded wait and nobody else anything (issue 15).

Before these limits a read on a stalled blob waited as long as the blob did, a reader of another
layer waited on a shared chunk's stalled fetch, and a stalled blob could take any number of the
registry client's connections.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher, FetchConfig, ReadDeadlineExceeded
from fusefs.layer import Layer
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024


class StalledBlob(FakeBlob):
    """A blob whose ranges never answer; it counts the requests waiting on it."""

    def __init__(self, data: bytes, *, digest: str | None = None) -> None:
        super().__init__(data, digest=digest)
        self.waiting = 0
        self.most_waiting = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await trio.sleep_forever()
        finally:
            self.waiting -= 1
        raise AssertionError("unreachable")


async def open_fetcher(tmp_path: Path, nursery: trio.Nursery, **config: float) -> ChunkFetcher:
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    return ChunkFetcher(cache, nursery, FetchConfig(**config), fake_decoder)  # type: ignore[arg-type]


@trio_test
async def test_a_read_on_a_stalled_blob_fails_at_its_deadline(tmp_path: Path) -> None:
    index = FakeIndex([FakeEntry("f", content=os.urandom(10 * KiB))])
    async with trio.open_nursery() as nursery:
        fetcher = await open_fetcher(tmp_path, nursery, read_deadline=0.3)
        layer = Layer("stalled", 1, StalledBlob(index.blob_bytes), index)
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(ReadDeadlineExceeded):
            await fetcher.read(layer, index.by_path["f"], 0, 4096)
        assert 0.3 <= trio.current_time() - started < 2
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_reader_fetches_from_its_own_blob_when_another_layers_flight_stalls(
    tmp_path: Path,
) -> None:
    # Two layers with the same chunk (same digest) in different blobs: the first one stalls.
    content = os.urandom(20 * KiB)
    index = FakeIndex([FakeEntry("f", content=content)])
    stalled = StalledBlob(index.blob_bytes, digest="sha256:" + "a" * 64)
    healthy = FakeBlob(index.blob_bytes, digest="sha256:" + "b" * 64)
    async with trio.open_nursery() as nursery:
        fetcher = await open_fetcher(
            tmp_path, nursery, read_deadline=10, foreign_flight_patience=0.2
        )
        layer_a = Layer("a", 1, stalled, index)
        layer_b = Layer("b", 2, healthy, index)
        entry = index.by_path["f"]
        a_results: list[bytes] = []

        async def read_a() -> None:
            a_results.append(await fetcher.read(layer_a, entry, 0, 4096))

        nursery.start_soon(read_a)
        await trio.testing.wait_all_tasks_blocked()
        assert stalled.waiting == 1
        started = trio.current_time()
        with trio.fail_after(3):
            assert await fetcher.read(layer_b, entry, 0, 4096) == content[:4096]
        assert trio.current_time() - started < 1.5
        assert healthy.requests
        # The reader of the stalled layer got the same verified bytes, without waiting more.
        await trio.testing.wait_all_tasks_blocked()
        assert a_results == [content[:4096]]
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_stalled_blob_holds_at_most_blob_requests_ranges(tmp_path: Path) -> None:
    entries = [FakeEntry(f"f{i}", content=os.urandom(8 * KiB)) for i in range(40)]
    index = FakeIndex(entries)
    blob = StalledBlob(index.blob_bytes)
    async with trio.open_nursery() as nursery:
        # Tiny ranges: every file is a request of its own.
        fetcher = await open_fetcher(
            tmp_path, nursery, read_deadline=0.5, blob_requests=3, ondemand_range=1, max_gap=0
        )
        layer = Layer("stalled", 1, blob, index)
        failures = 0

        async def reader(name: str) -> None:
            nonlocal failures
            try:
                await fetcher.read(layer, index.by_path[name], 0, 100)
            except ReadDeadlineExceeded:
                failures += 1

        with trio.fail_after(5):
            async with trio.open_nursery() as readers:
                for i in range(40):
                    readers.start_soon(reader, f"f{i}")
        assert failures == 40
        assert blob.most_waiting == 3
        nursery.cancel_scope.cancel()
