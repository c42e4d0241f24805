"""Exec-aware prefetch: a program opened for execution is fetched whole with its loader and
libraries (found through symlinks, RUNPATH and other layers), within the depth, file and
concurrency limits, and never delays the open or the read that started it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from fusefs.cache import ChunkCache
from fusefs.exec_prefetch import EXEC_FLAG, ExecPrefetch, resolve_in
from fusefs.fetcher import ChunkFetcher, FetchConfig
from fusefs.handlers import LazyHandlers
from fusefs.index import EntryKind
from fusefs.inodes import InodeMap
from fusefs.layer import Layer
from fusefs.table import LayerTable
from tests.fusefs.elf_support import build_elf
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024
MULTIARCH = "usr/lib/x86_64-linux-gnu"


def _elf(needed: list[bytes], *, interpreter: bytes | None = None, size: int = 150 * KiB,
         runpath: bytes | None = None) -> bytes:
    head = build_elf(interpreter=interpreter, needed=needed, runpath=runpath)
    return head + os.urandom(size - len(head))


def _dirs(*paths: str) -> list[FakeEntry]:
    return [FakeEntry(path, kind=EntryKind.DIR, perm=0o755) for path in paths]


def _link(path: str, target: bytes) -> FakeEntry:
    return FakeEntry(path, kind=EntryKind.SYMLINK, perm=0o777, target=target)


def base_entries() -> list[FakeEntry]:
    """A merged-/usr Debian layout: /lib and /lib64 are links into /usr, libraries are links to
    versioned files, the loader is reached through /lib64."""
    return [
        *_dirs("usr", "usr/lib", MULTIARCH, "usr/lib64", "usr/share"),
        _link("lib", b"usr/lib"),
        _link("lib64", b"usr/lib64"),
        FakeEntry("usr/share/filler", content=os.urandom(300 * KiB)),
        FakeEntry(f"{MULTIARCH}/ld-linux-x86-64.so.2", content=_elf([])),
        _link("usr/lib64/ld-linux-x86-64.so.2", b"../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        FakeEntry(f"{MULTIARCH}/libc.so.6", content=_elf([b"ld-linux-x86-64.so.2"])),
        FakeEntry(f"{MULTIARCH}/libfoo.so.1.2.3", content=_elf([b"libbar.so.2", b"libc.so.6"])),
        _link(f"{MULTIARCH}/libfoo.so.1", b"libfoo.so.1.2.3"),
        FakeEntry(f"{MULTIARCH}/libbar.so.2", content=_elf([b"libbaz.so"])),
        FakeEntry(f"{MULTIARCH}/libbaz.so", content=_elf([])),  # depth 3
    ]


APP = ("usr/bin/app", _elf(
    [b"libfoo.so.1", b"libc.so.6", b"libmissing.so.9"],
    interpreter=b"/lib64/ld-linux-x86-64.so.2",
    size=400 * KiB,
))


class CountingBlob(FakeBlob):
    """Counts requests in flight at once; each takes a little while."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.active = 0
        self.most = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await trio.sleep(0.02)
            return await super().read_at(offset, length)
        finally:
            self.active -= 1


@asynccontextmanager
async def prefetcher(
    tmp_path: Path, layers_entries: list[list[FakeEntry]], **config: int
) -> AsyncIterator[tuple[ExecPrefetch, ChunkFetcher, list[Layer], list[FakeIndex]]]:
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    indexes = [FakeIndex(entries) for entries in layers_entries]
    layers = [
        Layer(f"l{slot}", slot, CountingBlob(index.blob_bytes), index)
        for slot, index in enumerate(indexes, start=1)
    ]
    async with trio.open_nursery() as nursery:
        fetch_config = FetchConfig(first_read_grace=3600, **config)  # type: ignore[arg-type]
        fetcher = ChunkFetcher(cache, nursery, fetch_config, fake_decoder)
        yield ExecPrefetch(fetcher, nursery, lambda: layers), fetcher, layers, indexes
        nursery.cancel_scope.cancel()


async def settled(prefetch: ExecPrefetch, fetcher: ChunkFetcher) -> None:
    with trio.fail_after(10):
        await trio.sleep(0)
        while prefetch.running or fetcher.flights.in_flight:
            await trio.sleep(0.01)


def whole(fetcher: ChunkFetcher, layer: Layer, index: FakeIndex, path: str) -> bool:
    chunks = index.chunks(index.by_path[path])
    return all(fetcher.flights.is_cached(layer, ref) or not fetcher.flights.is_missing(layer, ref)
               for ref in chunks)


def untouched(fetcher: ChunkFetcher, layer: Layer, index: FakeIndex, path: str) -> bool:
    return all(fetcher.flights.is_missing(layer, ref) for ref in index.chunks(index.by_path[path]))


LIBS = [f"{MULTIARCH}/{name}" for name in
        ("ld-linux-x86-64.so.2", "libc.so.6", "libfoo.so.1.2.3", "libbar.so.2")]


@trio_test
async def test_an_exec_open_fetches_the_program_its_loader_and_libraries(tmp_path: Path) -> None:
    entries = [*base_entries(), *_dirs("usr/bin"), FakeEntry(APP[0], perm=0o755, content=APP[1])]
    async with prefetcher(tmp_path, [entries]) as (prefetch, fetcher, [layer], [index]):
        app = index.by_path[APP[0]]
        prefetch.opened(layer, app, os.O_RDONLY)  # an ordinary open: nothing
        await settled(prefetch, fetcher)
        assert layer.blob.requests == []  # type: ignore[attr-defined]
        prefetch.opened(layer, app, os.O_RDONLY | EXEC_FLAG | os.O_LARGEFILE)
        await settled(prefetch, fetcher)
        for path in [APP[0], *LIBS]:
            assert whole(fetcher, layer, index, path), path
        assert untouched(fetcher, layer, index, f"{MULTIARCH}/libbaz.so")  # depth 3
        assert untouched(fetcher, layer, index, "usr/share/filler")
        assert prefetch.started == 5
        requests = len(layer.blob.requests)  # type: ignore[attr-defined]
        prefetch.opened(layer, app, EXEC_FLAG)  # the second exec: all there already
        await settled(prefetch, fetcher)
        assert len(layer.blob.requests) == requests  # type: ignore[attr-defined]


@trio_test
async def test_libraries_are_found_in_the_base_layer_and_through_runpath(tmp_path: Path) -> None:
    app = _elf([b"libc.so.6", b"libplug.so"], interpreter=b"/lib64/ld-linux-x86-64.so.2",
               runpath=b"$ORIGIN/../lib/app")
    upper = [*_dirs("opt", "opt/bin", "opt/lib", "opt/lib/app"),
             FakeEntry("opt/bin/app", perm=0o755, content=app),
             FakeEntry("opt/lib/app/libplug.so", content=_elf([]))]
    async with prefetcher(tmp_path, [upper, base_entries()]) as (prefetch, fetcher, layers, indexes):
        prefetch.first_page(layers[0], indexes[0].by_path["opt/bin/app"], 0, app[:4096])
        await settled(prefetch, fetcher)
        assert whole(fetcher, layers[0], indexes[0], "opt/lib/app/libplug.so")
        for path in LIBS[:2]:
            assert whole(fetcher, layers[1], indexes[1], path), path
        assert untouched(fetcher, layers[1], indexes[1], f"{MULTIARCH}/libfoo.so.1.2.3")


@trio_test
async def test_a_page_that_is_not_elf_or_not_the_first_starts_nothing(tmp_path: Path) -> None:
    entries = [*base_entries(), *_dirs("usr/bin"), FakeEntry(APP[0], perm=0o755, content=APP[1])]
    async with prefetcher(tmp_path, [entries]) as (prefetch, fetcher, [layer], [index]):
        prefetch.first_page(layer, index.by_path[APP[0]], 4096, APP[1][4096:8192])
        prefetch.first_page(layer, index.by_path["usr/share/filler"], 0, b"#!/bin/sh\n")
        await settled(prefetch, fetcher)
        assert prefetch.started == 0 and layer.blob.requests == []  # type: ignore[attr-defined]


@trio_test
async def test_limits_depth_files_and_concurrency(tmp_path: Path) -> None:
    entries = [*base_entries(), *_dirs("usr/bin"), FakeEntry(APP[0], perm=0o755, content=APP[1])]
    async with prefetcher(tmp_path / "a", [entries], exec_prefetch_depth=1) as (
        prefetch, fetcher, [layer], [index]
    ):
        prefetch.opened(layer, index.by_path[APP[0]], EXEC_FLAG)
        await settled(prefetch, fetcher)
        assert prefetch.started == 4  # the program, the loader, libfoo and libc
        assert untouched(fetcher, layer, index, f"{MULTIARCH}/libbar.so.2")
    async with prefetcher(tmp_path / "b", [entries], exec_prefetch_files=2) as (
        prefetch, fetcher, [layer], [index]
    ):
        prefetch.opened(layer, index.by_path[APP[0]], EXEC_FLAG)
        await settled(prefetch, fetcher)
        assert prefetch.started == 2
    async with prefetcher(tmp_path / "c", [entries], exec_prefetch_concurrency=1,
                          file_completion_range=1 << 20) as (prefetch, fetcher, [layer], [index]):
        prefetch.opened(layer, index.by_path[APP[0]], EXEC_FLAG)
        await settled(prefetch, fetcher)
        assert prefetch.started == 5
        assert layer.blob.most == 1  # type: ignore[attr-defined]
    async with prefetcher(tmp_path / "d", [entries], file_completion_range=1 << 20) as (
        prefetch, fetcher, [layer], [index]
    ):
        prefetch.opened(layer, index.by_path[APP[0]], EXEC_FLAG)
        await settled(prefetch, fetcher)
        assert layer.blob.most > 1  # type: ignore[attr-defined]  # the libraries in parallel


def test_symlink_loops_and_missing_paths_resolve_to_nothing() -> None:
    index = FakeIndex([_link("a", b"b"), _link("b", b"/a"), *_dirs("d"),
                       _link("d/up", b"../d/up"), FakeEntry("f", content=b"x")])
    layer = Layer("l", 1, FakeBlob(index.blob_bytes), index)
    assert resolve_in([layer], b"/a") is None
    assert resolve_in([layer], b"/d/up/x") is None
    assert resolve_in([layer], b"/nothing/here") is None
    assert resolve_in([layer], b"/f/below") is None
    assert resolve_in([layer], b"/d") is None  # a directory is not a library
    assert resolve_in([layer], b"/d/../f") == (layer, index.by_path["f"])


@trio_test
async def test_handlers_start_it_without_waiting(tmp_path: Path) -> None:
    entries = [*base_entries(), *_dirs("usr/bin"), FakeEntry(APP[0], perm=0o755, content=APP[1])]
    async with prefetcher(tmp_path, [entries]) as (prefetch, fetcher, [layer], [index]):
        table = LayerTable()
        table.add(layer)
        inodes = InodeMap()
        handlers = LazyHandlers(table, fetcher, inodes, mount_time_ns=5, exec_prefetch=prefetch)
        inode = inodes.inode(layer.slot, index.by_path[APP[0]])
        blob: CountingBlob = layer.blob  # type: ignore[assignment]
        blob.gate = trio.Event()  # nothing arrives: the open must answer anyway
        handlers.open(inode, os.O_RDONLY | EXEC_FLAG)
        await trio.sleep(0.05)
        assert prefetch.running == 1
        blob.gate.set()
        assert (await handlers.read(inode, 0, 4096))[:4] == b"\x7fELF"
        await settled(prefetch, fetcher)
        assert prefetch.started == 5
        lib = inodes.inode(layer.slot, index.by_path[f"{MULTIARCH}/libbar.so.2"])
        before = len(blob.requests)
        assert (await handlers.read(lib, 0, 4096))[:4] == b"\x7fELF"  # loaded ahead
        assert len(blob.requests) == before


@trio_test
async def test_its_bytes_count_as_prefetch_not_on_demand(tmp_path: Path) -> None:
    entries = [*base_entries(), *_dirs("usr/bin"), FakeEntry(APP[0], perm=0o755, content=APP[1])]
    async with prefetcher(tmp_path, [entries]) as (prefetch, fetcher, [layer], [index]):
        prefetch.opened(layer, index.by_path[APP[0]], EXEC_FLAG)
        await settled(prefetch, fetcher)
        kinds = layer.stats.meters.fetched_bytes
        assert kinds["prefetch"] > 5 * 150 * KiB and kinds["on_demand"] == 0, kinds
