"""Startup-profile prefetch and first-read recording in fusefs: the profiled files are fetched
in large ranges, the earliest read first, only as far as the recorded run read; hostile or
missing paths are skipped; and a profile never changes a served byte (chunks still verified)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher, FetchConfig, FetchError
from fusefs.first_reads import FirstReads
from fusefs.index import EntryKind
from fusefs.layer import Layer
from fusefs.profile_prefetch import plan, prefetch_profile
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024


def _entries() -> list[FakeEntry]:
    return [
        FakeEntry("usr", kind=EntryKind.DIR, perm=0o755),
        FakeEntry("usr/a", content=os.urandom(200 * KiB)),
        FakeEntry("usr/b", content=os.urandom(100 * KiB)),
        FakeEntry("usr/big", content=os.urandom(1024 * KiB)),
        FakeEntry("usr/c", content=os.urandom(50 * KiB)),
        FakeEntry("usr/bad", content=os.urandom(64 * KiB)),
        FakeEntry("etc", kind=EntryKind.DIR, perm=0o755),
        FakeEntry("etc/link", kind=EntryKind.SYMLINK, perm=0o777, target=b"../usr/c"),
    ]


@asynccontextmanager
async def layer_with_fetcher(tmp_path: Path) -> AsyncIterator[tuple[Layer, FakeIndex, ChunkFetcher]]:
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    index = FakeIndex(_entries(), corrupt_digest_of="usr/bad")
    layer = Layer("l1", 1, FakeBlob(index.blob_bytes), index)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, FetchConfig(first_read_grace=3600), fake_decoder)
        yield layer, index, fetcher
        nursery.cancel_scope.cancel()


def _fetched(fetcher: ChunkFetcher, layer: Layer, index: FakeIndex, path: str) -> list[bool]:
    return [not fetcher.flights.is_missing(layer, ref) for ref in index.chunks(index.by_path[path])]


@trio_test
async def test_profiled_files_are_fetched_earliest_first_and_only_as_far_as_read(
    tmp_path: Path,
) -> None:
    async with layer_with_fetcher(tmp_path) as (layer, index, fetcher):
        files = [("/usr/c", 50 * KiB), ("/usr/big", 100 * KiB), ("/usr/a", 200 * KiB)]
        ranges = await plan(layer, files, max_gap=fetcher.config.max_gap)
        # /usr/c was read first: its range goes first, though it is last in the blob.
        first = ranges[0]
        assert {tag[0] for tag, _ in first.chunks} >= {index.by_path["usr/c"]}
        await prefetch_profile(fetcher, layer, files)
        await fetcher.writes_done()
        assert all(_fetched(fetcher, layer, index, "usr/a"))
        assert all(_fetched(fetcher, layer, index, "usr/c"))
        big = _fetched(fetcher, layer, index, "usr/big")
        assert big[:2] == [True, True] and not any(big[3:])  # 100 KiB read: two 64 KiB chunks
        assert not any(_fetched(fetcher, layer, index, "usr/b"))
        # Few, large requests rather than one per chunk.
        assert len(layer.blob.requests) <= 3  # type: ignore[attr-defined]


@trio_test
async def test_hostile_and_missing_paths_are_skipped(tmp_path: Path) -> None:
    async with layer_with_fetcher(tmp_path) as (layer, index, fetcher):
        files = [("/usr/../usr/b", 1 << 40), ("/nope", 10), ("/usr", 10), ("relative/usr/a", 10),
                 ("/etc/link", 50 * KiB), ("/usr/b\x00", 10)]
        await prefetch_profile(fetcher, layer, files)
        await fetcher.writes_done()
        # ".." inside the layer stays inside it; the symlink is followed within the layer.
        assert all(_fetched(fetcher, layer, index, "usr/c"))
        assert not any(_fetched(fetcher, layer, index, "usr/a"))
        assert not any(_fetched(fetcher, layer, index, "usr/big"))


@trio_test
async def test_a_profile_never_changes_served_bytes(tmp_path: Path) -> None:
    """The profile names a file whose chunk does not match its TOC digest: prefetch does not
    cache it, and a reader still gets an error, never the bytes."""
    async with layer_with_fetcher(tmp_path) as (layer, index, fetcher):
        bad = index.by_path["usr/bad"]
        await prefetch_profile(fetcher, layer, [("/usr/bad", 64 * KiB), ("/usr/b", 100 * KiB)])
        await fetcher.writes_done()
        assert not any(fetcher.flights.is_cached(layer, ref) for ref in index.chunks(bad))
        with pytest.raises(FetchError):
            await fetcher.read(layer, bad, 0, 4096)
        good = index.by_path["usr/b"]
        data = await fetcher.read(layer, good, 0, 100 * KiB)
        assert data == index._nodes[good].content  # the profiled bytes, as the TOC says


class _Layer:
    def __init__(self, layer_id: str, index: FakeIndex) -> None:
        self.layer_id = layer_id
        self.index = index


@trio_test
async def test_first_reads_are_recorded_in_order_within_the_window_and_bounded() -> None:
    index = FakeIndex(_entries())
    layer = _Layer("l1", index)
    reads = FirstReads(window=0.2, max_files=3)
    a, b, c, big = (index.by_path[p] for p in ("usr/a", "usr/b", "usr/c", "usr/big"))
    reads.read(layer, b, 0, 4096)  # type: ignore[arg-type]
    reads.read(layer, a, 0, 4096)  # type: ignore[arg-type]
    reads.read(layer, b, 8192, 4096)  # type: ignore[arg-type]  # extends b, keeps its place
    reads.read(layer, c, 40 * KiB, 1 << 30)  # type: ignore[arg-type]  # clipped to the size
    reads.read(layer, big, 0, 10)  # type: ignore[arg-type]  # a fourth file: over max_files
    recorded = reads.of(layer)  # type: ignore[arg-type]
    assert [(r.path, r.read_bytes) for r in recorded] == [
        ("/usr/b", 12288), ("/usr/a", 4096), ("/usr/c", 50 * KiB)]
    late = FirstReads(window=0.05, max_files=10)
    late.read(layer, a, 0, 1)  # type: ignore[arg-type]
    await trio.sleep(0.1)
    late.read(layer, b, 0, 1)  # type: ignore[arg-type]  # after the window: not recorded
    assert [r.path for r in late.of(layer)] == ["/usr/a"]  # type: ignore[arg-type]
    late.forget("l1")
    assert late.of(layer) == []  # type: ignore[arg-type]
