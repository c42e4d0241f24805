"""Per-layer cached bytes kept by the chunk cache, and garbage collection of the cache.

The reference for ``cached_bytes`` is the walk ``LazyFilesystem.usage`` used to do: every
non-zero chunk of the layer whose key is in the cache, counted once per occurrence. The counter
kept by the cache must equal it at every point, whatever happened to the cache in between.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs import filesystem as filesystem_module
from fusefs.background import fetch_everything
from fusefs.cache import ChunkCache, chunk_key
from fusefs.fetcher import ChunkFetcher, FetchConfig
from fusefs.filesystem import LazyFilesystem
from fusefs.index import EntryKind
from fusefs.layer import Layer
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024
# Small ranges, no memory LRU, and background fetch without its waits for readers.
QUICK = FetchConfig(
    ondemand_range=64 * KiB, hot_bytes=0, quiet_period=0, first_read_grace=0,
    readahead_max_range=64 * KiB,
)
SHARED = os.urandom(150 * KiB)  # in both layers: content-addressed chunks counted for each


def walk(cache: ChunkCache, layer: Layer) -> int:
    """What ``usage()`` computed before the counter: O(chunks)."""
    return sum(
        ref.size
        for _, ref in layer.all_chunks()
        if not ref.zeros and chunk_key(ref, layer.digest) in cache
    )


def layer_a() -> FakeIndex:
    entries = [FakeEntry("d", kind=EntryKind.DIR, perm=0o755)]
    entries += [FakeEntry(f"d/a{i}", content=os.urandom(100 * KiB)) for i in range(8)]
    entries += [
        FakeEntry("shared", content=SHARED),
        FakeEntry("copy-of-shared", content=SHARED),  # the same chunks twice in one layer
        FakeEntry("empty"),
    ]
    return FakeIndex(entries, chunk_size=64 * KiB)


def layer_b() -> FakeIndex:
    entries = [FakeEntry("shared", content=SHARED)]
    entries += [FakeEntry(f"b{i}", content=os.urandom(70 * KiB)) for i in range(5)]
    return FakeIndex(entries, chunk_size=64 * KiB)


def layer_without_digests() -> FakeIndex:
    entries = [FakeEntry(f"c{i}", content=os.urandom(90 * KiB)) for i in range(4)]
    return FakeIndex(entries, chunk_size=64 * KiB, with_digests=False)


def make_layer(name: str, slot: int, index: FakeIndex) -> Layer:
    return Layer(name, slot, FakeBlob(index.blob_bytes), index)


def assert_counts(cache: ChunkCache, *layers: Layer) -> None:
    for layer in layers:
        assert layer.track_cached_bytes(cache)  # already complete: a no-op
        assert layer.cached_bytes == walk(cache, layer), layer.layer_id


@asynccontextmanager
async def running_fetcher(
    cache_dir: Path, capacity: int = 1 << 30
) -> AsyncIterator[tuple[ChunkFetcher, ChunkCache]]:
    cache = await ChunkCache.open(cache_dir, capacity_bytes=capacity)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, QUICK, fake_decoder)
        yield fetcher, cache
        nursery.cancel_scope.cancel()


async def settle(fetcher: ChunkFetcher, layer: Layer, *paths: str) -> None:
    """Read whole files (file completion runs in the background), then wait for quiet."""
    index = layer.index
    assert isinstance(index, FakeIndex)
    for path in paths:
        entry = index.by_path[path]
        await fetcher.read(layer, entry, 0, index.attr(entry).size)
    with trio.fail_after(10):
        while True:
            before = fetcher.cache.usage()
            await trio.sleep(0.05)
            if fetcher.cache.usage() == before:
                return


@trio_test
async def test_counter_equals_the_walk_through_reads_background_and_restart(
    tmp_path: Path,
) -> None:
    a_index, b_index, c_index = layer_a(), layer_b(), layer_without_digests()
    async with running_fetcher(tmp_path / "cache") as (fetcher, cache):
        a, b, c = (make_layer("a", 1, a_index), make_layer("b", 2, b_index),
                   make_layer("c", 3, c_index))
        for layer in (a, b, c):
            assert layer.track_cached_bytes(cache)
        assert_counts(cache, a, b, c)
        assert a.cached_bytes == b.cached_bytes == c.cached_bytes == 0

        await settle(fetcher, a, "d/a0", "d/a3")
        assert_counts(cache, a, b, c)
        assert a.cached_bytes > 0 and b.cached_bytes == 0

        await settle(fetcher, b, "shared")  # stored for b, counted for a twice (two copies)
        assert_counts(cache, a, b, c)
        assert b.cached_bytes >= len(SHARED)  # readahead may bring some of b's other files

        await settle(fetcher, c, "c1")
        assert_counts(cache, a, b, c)
        assert c.cached_bytes >= 90 * KiB

        await fetch_everything(fetcher, a)
        await fetcher.writes_done()  # stores reach the cache after the fetch
        assert a.stats.blob_verified
        assert_counts(cache, a, b, c)
        assert a.cached_bytes == walk_total(a)

    # A restart: the cache is scanned from disk and fresh layers are registered against it.
    async with running_fetcher(tmp_path / "cache") as (_, reopened):
        a2, b2, c2 = (make_layer("a", 1, a_index), make_layer("b", 2, b_index),
                      make_layer("c", 3, c_index))
        for layer in (a2, b2, c2):
            layer.track_cached_bytes(reopened)
        assert_counts(reopened, a2, b2, c2)
        assert a2.cached_bytes == walk_total(a2) and c2.cached_bytes == c.cached_bytes > 0


def walk_total(layer: Layer) -> int:
    return sum(ref.size for _, ref in layer.all_chunks() if not ref.zeros)


@trio_test
async def test_counter_follows_eviction_and_corruption(tmp_path: Path) -> None:
    a_index, b_index = layer_a(), layer_b()
    async with running_fetcher(tmp_path / "cache", capacity=400 * KiB) as (fetcher, cache):
        a, b = make_layer("a", 1, a_index), make_layer("b", 2, b_index)
        a.track_cached_bytes(cache)
        b.track_cached_bytes(cache)
        await fetch_everything(fetcher, b)
        await fetcher.writes_done()  # stores reach the cache after the fetch
        assert_counts(cache, a, b)
        await fetch_everything(fetcher, a)  # far more than 400 KiB: evicts as it goes
        await fetcher.writes_done()  # stores reach the cache after the fetch
        assert cache.usage().evictions > 0
        assert_counts(cache, a, b)
        assert a.cached_bytes + b.cached_bytes > 0

        # A cached file damaged on disk is found on load, deleted and uncounted.
        entry = b_index.by_path["b4"]
        ref = b_index.chunks(entry)[0]
        key = chunk_key(ref, b.digest)
        if key not in cache:
            await settle(fetcher, b, "b4")
        assert key in cache
        before = b.cached_bytes
        shard = key.split("-", 2)[1][:2]
        (tmp_path / "cache" / shard / key).write_bytes(b"not the chunk")
        assert await cache.load(key, ref.digest) is None
        assert cache.usage().verify_failures == 1
        assert b.cached_bytes == before - ref.size
        assert_counts(cache, a, b)


@trio_test
async def test_tracking_in_steps_and_untracking(tmp_path: Path) -> None:
    index = layer_a()
    async with running_fetcher(tmp_path / "cache") as (fetcher, cache):
        helper = make_layer("helper", 9, index)
        helper.track_cached_bytes(cache)
        await fetch_everything(fetcher, helper)
        await fetcher.writes_done()  # stores reach the cache after the fetch
        helper.untrack_cached_bytes()
        assert cache.owners() == []

        layer = make_layer("a", 1, index)
        steps = 1
        while not layer.track_cached_bytes(cache, budget=2):
            steps += 1
            partial = layer.cached_bytes
            assert 0 <= partial <= walk(cache, layer)
        assert steps > 3
        assert layer.cached_bytes == walk(cache, layer) == walk_total(layer)
        assert layer.track_cached_bytes(cache, budget=2)  # complete: nothing registered twice
        assert layer.cached_bytes == walk_total(layer)

        while not layer.untrack_cached_bytes(budget=3):
            pass
        assert layer.cached_bytes == 0 and cache.owners() == []
        # No longer counted: cache changes leave it alone.
        await cache.collect_garbage(lambda: ())
        assert layer.cached_bytes == 0 and cache.usage().chunks == 0


# -- garbage collection ------------------------------------------------------------------------


def files_in(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.rglob("*") if p.is_file()}


def keys_of(layer: Layer) -> set[str]:
    return {chunk_key(ref, layer.digest) for _, ref in layer.all_chunks() if not ref.zeros}


@trio_test
async def test_garbage_collection_keeps_what_live_layers_reference(tmp_path: Path) -> None:
    async with running_fetcher(tmp_path / "cache") as (fetcher, cache):
        a, b, c = (make_layer("a", 1, layer_a()), make_layer("b", 2, layer_b()),
                   make_layer("c", 3, layer_without_digests()))
        for layer in (a, b, c):
            layer.track_cached_bytes(cache)
            await fetch_everything(fetcher, layer)
            await fetcher.writes_done()  # stores reach the cache after the fetch
        everything = files_in(tmp_path / "cache")
        assert everything == keys_of(a) | keys_of(b) | keys_of(c)
        total = cache.usage().bytes

        # b is gone: its own chunks go, the one it shares with a stays.
        b.untrack_cached_bytes()
        removed, removed_bytes = await cache.collect_garbage(lambda: {a, c})
        assert files_in(tmp_path / "cache") == keys_of(a) | keys_of(c)
        assert removed == len(keys_of(b) - keys_of(a))
        assert removed_bytes == total - cache.usage().bytes == 5 * 70 * KiB
        assert_counts(cache, a, c)

        # c is not attached but still recorded: its digest-less chunks are kept by blob digest,
        # and a's content-addressed chunks by the conservative rule, though nobody holds them.
        assert await cache.collect_garbage(
            lambda: (), keep_content_addressed=True, keep_blob_digests=[c.digest]
        ) == (0, 0)
        # Without its digest, c's chunks go; a's stay (content-addressed).
        removed, _ = await cache.collect_garbage(lambda: (), keep_content_addressed=True)
        assert removed == len(keys_of(c))
        assert files_in(tmp_path / "cache") == keys_of(a)
        assert c.cached_bytes == 0  # still registered, so still counted: now nothing
        assert await cache.collect_garbage(lambda: ()) == (len(keys_of(a)), walk_total_keys(a))
        assert files_in(tmp_path / "cache") == set() and cache.usage().bytes == 0
        assert a.cached_bytes == 0


def walk_total_keys(layer: Layer) -> int:
    sizes = {chunk_key(ref, layer.digest): ref.size for _, ref in layer.all_chunks()}
    return sum(sizes.values())


@trio_test
async def test_garbage_collection_leaves_a_chunk_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_fetcher(tmp_path / "cache") as (fetcher, cache):
        layer = make_layer("a", 1, layer_b())
        await fetch_everything(fetcher, layer)
        await fetcher.writes_done()  # stores reach the cache after the fetch
        entry = layer.index.file_entries()[0]
        ref = layer.index.chunks(entry)[0]
        key = chunk_key(ref, layer.digest)
        release = threading.Event()
        original = cache._load_sync

        def slow_load(k: str, digest: str | None) -> tuple[bytes | None, bool]:
            if k == key:
                release.wait(10)
            return original(k, digest)

        monkeypatch.setattr(cache, "_load_sync", slow_load)
        loaded: list[bytes | None] = []

        async def reader() -> None:
            loaded.append(await cache.load(key, ref.digest))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            removed, _ = await cache.collect_garbage(lambda: ())  # nobody references anything
            release.set()
        assert removed == len(keys_of(layer)) - 1
        assert loaded[0] is not None and len(loaded[0]) == ref.size
        assert files_in(tmp_path / "cache") == {key}


@trio_test
async def test_filesystem_usage_and_garbage_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LazyFilesystem without a kernel mount: usage() is the counter, collect_garbage keeps the
    attached layers' chunks, and a detached layer's registrations are withdrawn."""

    async def no_mount(*args: object, task_status: trio.TaskStatus[None], **kwargs: object) -> None:
        task_status.started()
        await trio.sleep_forever()

    monkeypatch.setattr(filesystem_module.session, "serve", no_mount)
    a_index, b_index = layer_a(), layer_b()
    fs = LazyFilesystem(tmp_path / "mnt", tmp_path / "cache", config=QUICK, decoder=fake_decoder)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        await fs.attach("a", FakeBlob(a_index.blob_bytes), a_index, background_fetch=True)
        await fs.attach("b", FakeBlob(b_index.blob_bytes), b_index, background_fetch=True)
        a_total = sum(c.size for f in a_index.file_entries() for c in a_index.chunks(f))
        b_total = len(SHARED) + 5 * 70 * KiB
        with trio.fail_after(20):  # background fetch, then the cache writes behind it
            while (fs.usage("a").cached_bytes, fs.usage("b").cached_bytes) != (a_total, b_total):
                await trio.sleep(0.05)
        assert await fs.collect_garbage() == (0, 0)

        await fs.detach("b")
        await fs.release_detached_layers()
        cache_usage = fs.cache_usage()
        assert cache_usage is not None
        removed, removed_bytes = await fs.collect_garbage()
        assert (removed, removed_bytes) == (5 * 2, 5 * 70 * KiB)  # 70 KiB = two 64 KiB chunks
        assert fs.usage("a").cached_bytes == a_total
        after = fs.cache_usage()
        assert after is not None and after.bytes == cache_usage.bytes - removed_bytes
        # A recorded layer whose chunk list is unknown: its blob keeps nothing here, but the
        # content-addressed rule keeps a's chunks even once a is gone.
        await fs.detach("a")
        assert await fs.collect_garbage(keep_content_addressed=True) == (0, 0)
        removed, _ = await fs.collect_garbage()
        assert removed > 0 and files_in(tmp_path / "cache") == set()
        fs.unmount()


@trio_test
async def test_track_usage_registers_a_layer_in_steps_that_let_others_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first Usage of a layer registers its chunks a few at a time, with checkpoints
    between, not in one walk on the trio thread; ``usage`` then counts them all."""

    async def no_mount(*args: object, task_status: trio.TaskStatus[None], **kwargs: object) -> None:
        task_status.started()
        await trio.sleep_forever()

    monkeypatch.setattr(filesystem_module.session, "serve", no_mount)
    monkeypatch.setattr(filesystem_module, "_ACCOUNTING_STEP", 2)
    index = layer_a()
    fs = LazyFilesystem(tmp_path / "mnt", tmp_path / "cache", config=QUICK, decoder=fake_decoder)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        await fs.attach("a", FakeBlob(index.blob_bytes), index, background_fetch=True)
        total = sum(c.size for f in index.file_entries() for c in index.chunks(f))
        with trio.fail_after(20):
            await fs.writes_done()
            while fs.meters("a") is not None and not fs.usage("a").background_done:
                await trio.sleep(0.05)
            await fs.writes_done()
        # A fresh start of the counting, as on the first Usage after a restart.
        layer = fs._table.by_id("a")
        assert layer is not None
        assert layer.untrack_cached_bytes()
        ticks = 0
        counting = True

        async def ticker() -> None:
            nonlocal ticks
            while counting:
                ticks += 1
                await trio.lowlevel.checkpoint()

        nursery.start_soon(ticker)
        await fs.track_usage("a")
        counting = False
        # Old code had no steps: usage() walked every file at once. Eleven files, two a step.
        assert ticks >= 4
        assert fs.usage("a").cached_bytes == total
        await fs.track_usage("gone")  # not attached: nothing to do
        fs.unmount()
        nursery.cancel_scope.cancel()
