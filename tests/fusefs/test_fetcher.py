from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs.background import fetch_everything, prefetch
from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher, FetchConfig, FetchError
from fusefs.index import EntryKind
from fusefs.layer import Layer
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024


def small_files(count: int, size: int) -> list[FakeEntry]:
    return [FakeEntry("d", kind=EntryKind.DIR, perm=0o755)] + [
        FakeEntry(f"d/f{i}", content=os.urandom(size)) for i in range(count)
    ]


@asynccontextmanager
async def fetcher_for(
    tmp_path: Path, index: FakeIndex, blob: FakeBlob | None = None, **config: float
) -> AsyncIterator[tuple[ChunkFetcher, Layer, FakeBlob]]:
    blob = blob or FakeBlob(index.blob_bytes)
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    # In these small blobs every miss is near the last one: nearby fetch would blur what the
    # other policies' tests count. Its own tests (test_nearby_fetch.py) turn it on.
    config.setdefault("nearby_span", 0)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, FetchConfig(**config), fake_decoder)  # type: ignore[arg-type]
        yield fetcher, Layer("l1", 1, blob, index), blob
        nursery.cancel_scope.cancel()


@trio_test
async def test_read_returns_the_file_bytes_across_chunks(tmp_path: Path) -> None:
    content = os.urandom(300 * KiB + 7)
    index = FakeIndex([FakeEntry("big", content=content)], chunk_size=64 * KiB)
    async with fetcher_for(tmp_path, index) as (fetcher, layer, _):
        entry = index.by_path["big"]
        assert await fetcher.read(layer, entry, 0, len(content) + 100) == content
        assert await fetcher.read(layer, entry, 60 * KiB, 10 * KiB) == content[60 * KiB : 70 * KiB]
        assert await fetcher.read(layer, entry, len(content), 10) == b""


@trio_test
async def test_concurrent_readers_share_one_fetch(tmp_path: Path) -> None:
    content = os.urandom(200 * KiB)
    index = FakeIndex([FakeEntry("f", content=content)], chunk_size=256 * KiB)
    blob = FakeBlob(index.blob_bytes)
    blob.gate = trio.Event()
    async with fetcher_for(tmp_path, index, blob) as (fetcher, layer, _):
        results: list[bytes] = []

        async def reader(offset: int) -> None:
            results.append(await fetcher.read(layer, index.by_path["f"], offset, 4096))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i * 4096)
            await trio.testing.wait_all_tasks_blocked()
            blob.gate.set()
        assert len(blob.requests) == 1
        assert sorted(results) == sorted(content[i * 4096 : (i + 1) * 4096] for i in range(8))


@trio_test
async def test_neighbouring_small_files_come_in_one_request(tmp_path: Path) -> None:
    index = FakeIndex(small_files(50, 3000))
    async with fetcher_for(tmp_path, index, ondemand_range=64 * KiB) as (fetcher, layer, blob):
        first = index.by_path["d/f0"]
        assert len(await fetcher.read(layer, first, 0, 4096)) == 3000
        assert len(blob.requests) == 1
        _, length = blob.requests[0]
        assert 32 * KiB < length <= 64 * KiB
        requests = len(blob.requests)
        # The following files are now served from the cache without another request.
        for i in range(1, 10):
            entry = index.by_path[f"d/f{i}"]
            assert await fetcher.read(layer, entry, 0, 4096) == index._nodes[entry].content
        assert len(blob.requests) == requests


@trio_test
async def test_first_read_fetches_the_rest_of_the_file(tmp_path: Path) -> None:
    content = os.urandom(1024 * KiB)
    index = FakeIndex([FakeEntry("f", content=content)], chunk_size=64 * KiB)
    async with fetcher_for(
        tmp_path, index, ondemand_range=64 * KiB, file_completion_range=128 * KiB
    ) as (fetcher, layer, blob):
        await fetcher.read(layer, index.by_path["f"], 0, 4096)
        assert blob.requests[0][1] <= 64 * KiB + 200  # the reader waits for one small range
        with trio.fail_after(10):
            while fetcher.cache.usage().bytes < len(content):
                await trio.sleep(0.01)
        requests = len(blob.requests)
        assert requests > 1  # in ranges of at most 128 KiB, not one giant request
        assert all(length <= 128 * KiB + 200 for _, length in blob.requests)
        assert await fetcher.read(layer, index.by_path["f"], 0, len(content)) == content
        assert len(blob.requests) == requests


@trio_test
async def test_digest_mismatch_fails_and_caches_nothing(tmp_path: Path) -> None:
    index = FakeIndex(
        [FakeEntry("bad", content=b"x" * 5000), FakeEntry("good", content=b"y" * 5000)],
        corrupt_digest_of="bad",
    )
    async with fetcher_for(tmp_path, index) as (fetcher, layer, _):
        with pytest.raises(FetchError, match="digest mismatch"):
            await fetcher.read(layer, index.by_path["bad"], 0, 100)
        assert layer.stats.verify_failures == 1
        await fetcher.writes_done()
        assert fetcher.cache.usage().chunks == 1  # only the good neighbour reached the disk
        # The neighbour fetched in the same range is fine.
        assert await fetcher.read(layer, index.by_path["good"], 0, 100) == b"y" * 100
        with pytest.raises(FetchError):  # and the bad one fails again, never wrong bytes
            await fetcher.read(layer, index.by_path["bad"], 0, 100)


class RedirectedBlob(FakeBlob):
    """A blob whose reader reuses a redirect target, like the registry's."""

    forgotten = 0

    def forget_redirect(self) -> None:
        self.forgotten += 1


@trio_test
async def test_a_chunk_failing_verification_drops_the_blobs_redirect(tmp_path: Path) -> None:
    index = FakeIndex([FakeEntry("bad", content=b"x" * 5000)], corrupt_digest_of="bad")
    blob = RedirectedBlob(index.blob_bytes)
    async with fetcher_for(tmp_path, index, blob) as (fetcher, layer, _):
        with pytest.raises(FetchError, match="digest mismatch"):
            await fetcher.read(layer, index.by_path["bad"], 0, 100)
        assert blob.forgotten == 1


@trio_test
async def test_blob_failure_reaches_every_waiter_and_is_retried_later(tmp_path: Path) -> None:
    index = FakeIndex([FakeEntry("f", content=b"q" * 10000)])
    blob = FakeBlob(index.blob_bytes)
    blob.fail = True
    async with fetcher_for(tmp_path, index, blob) as (fetcher, layer, _):
        errors: list[BaseException] = []

        async def reader() -> None:
            try:
                await fetcher.read(layer, index.by_path["f"], 0, 100)
            except FetchError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
        assert len(errors) == 3 and len(blob.requests) == 1
        blob.fail = False
        assert await fetcher.read(layer, index.by_path["f"], 0, 100) == b"q" * 100


@trio_test
async def test_prefetch_fetches_the_landmark_range_in_one_request(tmp_path: Path) -> None:
    entries = small_files(20, 2000)
    index = FakeIndex(entries, prefetch_paths=["d/f5", "d/f6", "d/f7"])
    async with fetcher_for(tmp_path, index) as (fetcher, layer, blob):
        await prefetch(fetcher, layer)
        assert blob.requests == [(0, index.prefetch_end)]
        assert fetcher.cache.usage().chunks == 3


@trio_test
async def test_background_fetch_caches_everything_and_verifies_the_blob(tmp_path: Path) -> None:
    index = FakeIndex(small_files(40, 20_000), prefetch_paths=["d/f3"])
    async with fetcher_for(tmp_path, index, background_range=100 * KiB) as (fetcher, layer, blob):
        await fetch_everything(fetcher, layer)
        assert layer.stats.blob_verified is True and layer.stats.background_done
        assert fetcher.cache.usage().chunks == 40
        assert blob.requests[0] == (0, index.prefetch_end)
        assert sum(length for _, length in blob.requests) == blob.size


@trio_test
async def test_background_fetch_reports_a_blob_digest_mismatch(tmp_path: Path) -> None:
    index = FakeIndex(small_files(5, 1000))
    blob = FakeBlob(index.blob_bytes, digest="sha256:" + "f" * 64)
    async with fetcher_for(tmp_path, index, blob) as (fetcher, layer, _):
        await fetch_everything(fetcher, layer)
        assert layer.stats.blob_verified is False
        assert layer.stats.errors == 1


@trio_test
async def test_background_waits_for_on_demand_reads(tmp_path: Path) -> None:
    index = FakeIndex(small_files(10, 20_000))  # no prefetch landmark
    async with fetcher_for(tmp_path, index, background_range=30 * KiB) as (fetcher, layer, blob):
        async with trio.open_nursery() as nursery:
            with fetcher.foreground():
                nursery.start_soon(fetch_everything, fetcher, layer)
                await trio.sleep(0.2)
                # No background range starts while a reader is waiting on the link.
                assert blob.requests == []
            with trio.fail_after(10):
                while not layer.stats.background_done:
                    await trio.sleep(0.01)
        assert len(blob.requests) > 1 and layer.stats.blob_verified


@trio_test
async def test_reader_waits_for_a_background_range_instead_of_fetching_it_again(
    tmp_path: Path,
) -> None:
    index = FakeIndex(small_files(10, 20_000))
    blob = FakeBlob(index.blob_bytes)
    blob.gate = trio.Event()
    async with fetcher_for(tmp_path, index, blob, background_range=1024 * KiB) as (
        fetcher, layer, _
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_everything, fetcher, layer)
            with trio.fail_after(10):
                while not blob.requests:
                    await trio.sleep(0.01)
            # The whole blob is one background range, in flight; a reader arrives.
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await fetcher.read(layer, index.by_path["d/f5"], 0, 100))

            nursery.start_soon(reader)
            await trio.sleep(0.1)
            assert len(blob.requests) == 1, "the reader must not request claimed bytes again"
            blob.gate.set()
        assert got == [index._nodes[index.by_path["d/f5"]].content[:100]]
        assert len(blob.requests) == 1 and layer.stats.blob_verified


@trio_test
async def test_writes_done_returns_when_a_write_starts_before_the_last_one_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter must not be left on the idle event of an earlier batch of writes: the python
    layer of a two-layer image never logged "fully fetched" because of that."""
    index = FakeIndex([FakeEntry("a", content=os.urandom(3000)),
                       FakeEntry("filler", content=os.urandom(1024 * KiB)),
                       FakeEntry("b", content=os.urandom(3000))])
    first_write_may_end = threading.Event()
    async with fetcher_for(tmp_path, index, ondemand_range=64 * KiB) as (fetcher, layer, blob):
        original = fetcher.cache.write_verified
        calls: list[str] = []

        def write_verified(key: str, data: bytes, expected_digest: str | None) -> None:
            calls.append(key)
            if len(calls) == 1:
                first_write_may_end.wait(10)
            original(key, data, expected_digest)

        monkeypatch.setattr(fetcher.cache, "write_verified", write_verified)
        await fetcher.read(layer, index.by_path["a"], 0, 100)  # its write is held
        idle = trio.Event()

        async def waiter() -> None:
            await fetcher.writes_done()
            idle.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await fetcher.read(layer, index.by_path["b"], 0, 100)  # a second batch starts
            first_write_may_end.set()
            with trio.fail_after(10):
                await idle.wait()
        assert len(blob.requests) == 2 and len(calls) >= 2
