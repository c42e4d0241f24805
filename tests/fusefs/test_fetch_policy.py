"""The read path's policy: readahead for forward walks, background fetch that leaves readers the
link, and background fetch that skips what readers fetched when chunk digests prove the blob."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from fusefs.background import chunks_prove_blob, fetch_everything, fetch_missing
from fusefs.index import EntryKind
from tests.fusefs.test_fetcher import fetcher_for, small_files
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, trio_test

KiB = 1024


@trio_test
async def test_a_forward_walk_gets_growing_ranges_requested_ahead(tmp_path: Path) -> None:
    index = FakeIndex(small_files(300, 3000))  # ~900 KB of small files in blob order
    async with fetcher_for(
        tmp_path,
        index,
        ondemand_range=8 * KiB,
        readahead_max_range=128 * KiB,
        max_gap=1024,
        directory_misses=10**6,  # one directory: readahead alone
    ) as (fetcher, layer, blob):
        for i in range(300):
            entry = index.by_path[f"d/f{i}"]
            assert await fetcher.read(layer, entry, 0, 4096) == index._nodes[entry].content
        lengths = [length for _, length in blob.requests]
        # One 8 KiB range per three files would be ~100 requests; readahead needs far fewer.
        assert len(lengths) < 25, lengths
        assert max(lengths) > 64 * KiB
        assert lengths[0] <= 8 * KiB + 3100
        assert sum(lengths) <= blob.size


@trio_test
async def test_a_miss_elsewhere_starts_again_from_the_small_range(tmp_path: Path) -> None:
    index = FakeIndex(small_files(300, 3000))
    async with fetcher_for(
        tmp_path,
        index,
        ondemand_range=8 * KiB,
        readahead_max_range=128 * KiB,
        max_gap=1024,
        directory_misses=10**6,  # one directory: readahead alone
    ) as (fetcher, layer, blob):
        for i in range(40):
            await fetcher.read(layer, index.by_path[f"d/f{i}"], 0, 10)
        with trio.fail_after(10):  # let the range requested ahead land
            while fetcher.flights.in_flight:
                await trio.sleep(0.01)
        before = len(blob.requests)
        await fetcher.read(layer, index.by_path["d/f250"], 0, 10)
        assert len(blob.requests) == before + 1
        assert blob.requests[-1][1] <= 8 * KiB + 3100


@trio_test
async def test_background_waits_out_the_grace_after_attach(tmp_path: Path) -> None:
    index = FakeIndex(small_files(10, 20_000))
    async with fetcher_for(
        tmp_path, index, background_range=30 * KiB, first_read_grace=0.5
    ) as (fetcher, layer, blob):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_everything, fetcher, layer)
            await trio.sleep(0.2)
            assert blob.requests == []  # the container's first reads find the link empty
            with trio.fail_after(10):
                while not layer.stats.background_done:
                    await trio.sleep(0.01)
        assert layer.stats.blob_verified


@trio_test
async def test_background_waits_for_a_quiet_period_after_a_reader(tmp_path: Path) -> None:
    index = FakeIndex(small_files(10, 20_000))
    async with fetcher_for(
        tmp_path, index, background_range=30 * KiB, first_read_grace=0, quiet_period=0.5
    ) as (fetcher, layer, blob):
        async with trio.open_nursery() as nursery:
            with fetcher.foreground():
                nursery.start_soon(fetch_everything, fetcher, layer)
                await trio.sleep(0.05)
            await trio.sleep(0.2)
            assert blob.requests == []  # the reader stopped waiting only 0.2 s ago
            with trio.fail_after(10):
                while not layer.stats.background_done:
                    await trio.sleep(0.01)
        assert layer.stats.blob_verified


@trio_test
async def test_background_joins_a_long_read(tmp_path: Path) -> None:
    index = FakeIndex(small_files(10, 20_000))
    async with fetcher_for(
        tmp_path,
        index,
        background_range=30 * KiB,
        first_read_grace=0,
        long_read=0.3,
        long_read_bytes=0,
    ) as (fetcher, layer, blob):
        async with trio.open_nursery() as nursery:
            with fetcher.foreground():  # a reader that keeps waiting, as a full scan does
                nursery.start_soon(fetch_everything, fetcher, layer)
                with trio.fail_after(10):
                    while not layer.stats.background_done:
                        await trio.sleep(0.01)
        assert layer.stats.blob_verified and blob.requests


@trio_test
async def test_background_joins_a_long_read_only_after_its_bytes(tmp_path: Path) -> None:
    # Readers busy for long_read seconds but with few bytes fetched are a container starting
    # up: background ranges would only queue ahead of its misses.
    index = FakeIndex(small_files(10, 20_000))
    async with fetcher_for(
        tmp_path,
        index,
        background_range=30 * KiB,
        first_read_grace=0,
        long_read=0.3,
        long_read_bytes=60_000,
    ) as (fetcher, layer, blob):
        async with trio.open_nursery() as nursery:
            with fetcher.foreground():
                nursery.start_soon(fetch_everything, fetcher, layer)
                await trio.sleep(0.8)
                assert blob.requests == []  # busy long enough, but nothing fetched yet
                for i in range(4):  # 80 KB on demand: now a long read
                    await fetcher.read(layer, index.by_path[f"d/f{i}"], 0, 20_000)
                with trio.fail_after(10):
                    while not layer.stats.background_done:
                        await trio.sleep(0.01)
        assert layer.stats.blob_verified


def _trusted(count: int, size: int) -> FakeIndex:
    return FakeIndex(small_files(count, size), toc_trusted=True)


@trio_test
async def test_trusted_chunks_skip_what_readers_fetched(tmp_path: Path) -> None:
    index = _trusted(40, 20_000)
    async with fetcher_for(
        tmp_path, index, ondemand_range=64 * KiB, background_range=100 * KiB, first_read_grace=0
    ) as (fetcher, layer, blob):
        assert chunks_prove_blob(layer)
        for i in range(0, 40, 2):
            await fetcher.read(layer, index.by_path[f"d/f{i}"], 0, 10)
        on_demand = sum(length for _, length in blob.requests)
        await fetch_missing(fetcher, layer)
        assert layer.stats.blob_verified is True and layer.stats.background_done
        assert fetcher.cache.usage().chunks == 40
        total = sum(length for _, length in blob.requests)
        # The rest came without fetching again what readers had: no more than the blob.
        assert on_demand > 0 and total <= blob.size
        for i in range(40):
            entry = index.by_path[f"d/f{i}"]
            assert await fetcher.read(layer, entry, 0, 20_000) == index._nodes[entry].content


@trio_test
async def test_trusted_chunks_report_a_chunk_that_cannot_be_verified(tmp_path: Path) -> None:
    index = FakeIndex(small_files(5, 1000), toc_trusted=True, corrupt_digest_of="d/f2")
    async with fetcher_for(tmp_path, index, first_read_grace=0) as (fetcher, layer, _):
        await fetch_missing(fetcher, layer)
        assert layer.stats.blob_verified is False
        assert layer.stats.errors >= 1
        assert fetcher.cache.usage().chunks == 4


@trio_test
async def test_untrusted_or_digestless_layers_keep_the_whole_blob_check(tmp_path: Path) -> None:
    untrusted = FakeIndex(small_files(3, 1000))
    no_digests = FakeIndex(
        [FakeEntry("d", kind=EntryKind.DIR, perm=0o755), FakeEntry("d/f", content=os.urandom(99))],
        with_digests=False,
        toc_trusted=True,
    )
    for name, index in (("a", untrusted), ("b", no_digests)):
        async with fetcher_for(tmp_path / name, index, FakeBlob(index.blob_bytes)) as (
            _, layer, _
        ):
            assert not chunks_prove_blob(layer)


def _two_directories() -> FakeIndex:
    entries = [FakeEntry("a", kind=EntryKind.DIR, perm=0o755)]
    entries += [FakeEntry(f"a/f{i}", content=os.urandom(5000)) for i in range(30)]
    entries += [FakeEntry("b", kind=EntryKind.DIR, perm=0o755)]
    entries += [FakeEntry(f"b/f{i}", content=os.urandom(5000)) for i in range(30)]
    return FakeIndex(entries)


@trio_test
async def test_misses_in_one_directory_fetch_the_rest_of_it(tmp_path: Path) -> None:
    index = _two_directories()
    async with fetcher_for(
        tmp_path, index, ondemand_range=4 * KiB, max_gap=0, directory_misses=3
    ) as (fetcher, layer, blob):
        for i in (0, 10, 20):  # scattered misses, no readahead
            await fetcher.read(layer, index.by_path[f"a/f{i}"], 0, 10)
        chunks = [ref for i in range(30) for ref in index.chunks(index.by_path[f"a/f{i}"])]
        with trio.fail_after(10):  # the directory fetch runs in the background
            while not all(fetcher.flights.is_cached(layer, ref) for ref in chunks):
                await trio.sleep(0.01)
        requests = len(blob.requests)
        for i in range(30):
            entry = index.by_path[f"a/f{i}"]
            assert await fetcher.read(layer, entry, 0, 5000) == index._nodes[entry].content
        assert len(blob.requests) == requests  # all of a/ came with the directory fetch
        await fetcher.read(layer, index.by_path["b/f3"], 0, 10)
        assert len(blob.requests) == requests + 1  # b/ had one miss: only that range


@trio_test
async def test_a_directory_too_big_to_fetch_stays_on_demand(tmp_path: Path) -> None:
    index = _two_directories()
    async with fetcher_for(
        tmp_path,
        index,
        ondemand_range=4 * KiB,
        max_gap=0,
        directory_misses=3,
        directory_fetch_max=20 * KiB,
    ) as (fetcher, layer, blob):
        for i in (0, 10, 20):
            await fetcher.read(layer, index.by_path[f"a/f{i}"], 0, 10)
        await trio.sleep(0.2)
        assert len(blob.requests) == 3


@trio_test
async def test_a_miss_just_before_the_last_range_is_not_a_forward_walk(tmp_path: Path) -> None:
    # A reader going backward through a directory (files read in reverse blob order) misses a
    # little before the range it fetched last. That is no walk forward: it must get the small
    # range and nothing requested ahead, not a doubled range and readahead over bytes it has.
    index = FakeIndex(small_files(300, 3000))
    async with fetcher_for(
        tmp_path,
        index,
        ondemand_range=8 * KiB,
        readahead_max_range=128 * KiB,
        max_gap=16 * KiB,
        directory_misses=10**6,
    ) as (fetcher, layer, blob):
        await fetcher.read(layer, index.by_path["d/f100"], 0, 10)
        await fetcher.read(layer, index.by_path["d/f98"], 0, 10)
        with trio.fail_after(10):
            while fetcher.flights.in_flight:
                await trio.sleep(0.01)
        assert len(blob.requests) == 2, blob.requests
        first, second = blob.requests
        assert second[0] < first[0]
        assert second[1] <= 8 * KiB + 3100
