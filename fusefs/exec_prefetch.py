"""Exec-aware prefetch: a program about to run is fetched whole, with its loader and libraries.

A container's first seconds are mostly ``execve``: the kernel reads the executable's first
page, then the dynamic loader it names (``PT_INTERP``) maps the executable and opens each
``DT_NEEDED`` library in turn, each of them missing file after file, a round trip apiece.
All of them are known from a few bytes of the executable. So when a file is opened for
execution (FUSE OPEN flags carry ``__FMODE_EXEC``) or an ELF file's first page is read (the
loader and ``dlopen`` read libraries with plain opens), the file is fetched whole and its
interpreter and libraries are resolved in the image tree and fetched whole too, in parallel,
before the loader asks for them. Then their own libraries, down to ``exec_prefetch_depth``.

Everything goes through the read path's own machinery: chunks are claimed as background work
in ``ChunkFlights`` (single flight: a reader needing one waits for it, and fetches it itself if
the range fails) and verified like any other. Nothing waits for this work: the open and the
read that started it return at once.

Libraries are looked up in the executable's own layer first and then in the other attached
layers, nearest slot first: fusefs does not know which layers form one image, and an image's
layers are attached one after another, so a neighbouring slot is most likely its base layer.
A wrong guess costs prefetched bytes, never wrong bytes: the loader still opens the right file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import trio

from fusefs.elf_deps import HEAD_BYTES, ElfDeps, deps_from, parse_dynamic, parse_header
from fusefs.fetcher import ChunkFetcher
from fusefs.index import EntryKind, LayerIndex
from fusefs.layer import Layer
from fusefs.ranges import group_chunks
from fusefs.stats import PREFETCH, set_fetch_kind

log = logging.getLogger(__name__)

EXEC_FLAG = 0x20  # __FMODE_EXEC in the OPEN flags of an execve (include/linux/fcntl.h)
_MAX_SEEN = 100_000  # files remembered as done; past this the set starts over
_MAX_LAYERS = 16  # layers searched for a library, the executable's own first
_MAX_SYMLINKS = 16  # as the kernel's MAXSYMLINKS (40) but lower: library links are short
_MAX_STEPS = 256  # path components walked per lookup, symlink targets included
_READ_LIMIT = 1 << 20  # bytes read to parse a file beyond its first page

# Multiarch directories by e_machine (Debian's and Ubuntu's triplets).
_TRIPLETS = {
    3: b"i386-linux-gnu",
    21: b"powerpc64le-linux-gnu",
    22: b"s390x-linux-gnu",
    40: b"arm-linux-gnueabihf",
    62: b"x86_64-linux-gnu",
    183: b"aarch64-linux-gnu",
    243: b"riscv64-linux-gnu",
}
_PLAIN_DIRS = (b"/lib64", b"/usr/lib64", b"/lib", b"/usr/lib", b"/usr/local/lib")

Found = tuple[Layer, int]


class ExecPrefetch:
    """Started by ``LazyHandlers`` on an exec open or an ELF first page; runs in the
    filesystem's nursery. ``layers`` lists the attached layers."""

    def __init__(
        self, fetcher: ChunkFetcher, nursery: trio.Nursery, layers: Callable[[], Sequence[Layer]]
    ) -> None:
        config = fetcher.config
        self._fetcher = fetcher
        self._nursery = nursery
        self._layers = layers
        self._depth = config.exec_prefetch_depth
        self._max_files = config.exec_prefetch_files
        self._slots = trio.Semaphore(max(1, config.exec_prefetch_concurrency))
        self._seen: set[tuple[str, int]] = set()
        self.started = 0  # files fetched whole so far, for tests and debugging
        self.running = 0  # programs being prefetched

    # -- triggers (called from handlers that must not wait) ----------------------------------

    def opened(self, layer: Layer, entry: int, flags: int) -> None:
        if flags & EXEC_FLAG:
            self._start(layer, entry)

    def first_page(self, layer: Layer, entry: int, offset: int, data: bytes) -> None:
        if offset == 0 and data[:4] == b"\x7fELF":
            self._start(layer, entry)

    def _start(self, layer: Layer, entry: int) -> None:
        if not self._mark_seen(layer, entry):
            return
        try:
            self._nursery.start_soon(self._job, layer, entry)
            self.running += 1  # counted from here, so that "not running" means done
        except RuntimeError as exc:  # the filesystem is stopping: the open must not fail
            log.debug("exec prefetch not started layer=%s error=%r", layer.layer_id, exc)

    def _mark_seen(self, layer: Layer, entry: int) -> bool:
        key = (layer.layer_id, entry)
        if key in self._seen:
            return False
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        self._seen.add(key)
        return True

    # -- one program -------------------------------------------------------------------------

    async def _job(self, layer: Layer, entry: int) -> None:
        budget = [self._max_files - 1]  # files this program may still add
        # Counted as prefetch, not as the reader's on-demand bytes (metrics, ``long_read_bytes``);
        # the tasks started below inherit it.
        set_fetch_kind(PREFETCH)
        try:
            async with trio.open_nursery() as job:
                await self._file(job, budget, layer, entry, 0)
            log.debug(
                "exec prefetch done layer=%s entry=%d files=%d",
                layer.layer_id,
                entry,
                self._max_files - budget[0],
            )
        except Exception as exc:  # background work: never tear anything down
            log.warning(
                "exec prefetch failed layer=%s entry=%d error=%r", layer.layer_id, entry, exc
            )
        finally:
            self.running -= 1

    async def _file(
        self, job: trio.Nursery, budget: list[int], layer: Layer, entry: int, depth: int
    ) -> None:
        """Fetch ``entry`` whole and, above the depth limit, start on what it needs."""
        async with self._slots:
            self.started += 1
            async with trio.open_nursery() as inner:
                self._fetch_whole(inner, layer, entry)  # claimed now: parse reads wait on it
                if depth < self._depth:
                    inner.start_soon(self._follow, job, budget, layer, entry, depth)

    def _fetch_whole(self, nursery: trio.Nursery, layer: Layer, entry: int) -> None:
        config = self._fetcher.config
        flights = self._fetcher.flights
        chunks = layer.index.chunks(entry)
        if not chunks:
            return
        window_end = chunks[0].blob_offset + config.file_completion_window
        missing = [
            ((entry, number), ref)
            for number, ref in enumerate(chunks)
            if ref.blob_offset < window_end and not ref.zeros and flights.is_missing(layer, ref)
        ]
        missing.sort(key=lambda chunk: chunk[1].blob_offset)
        for planned in group_chunks(
            missing, max_range=config.file_completion_range, max_gap=config.max_gap
        ):
            claim = flights.claim(layer, planned, background=True)
            nursery.start_soon(flights.fetch_claimed, layer, planned, claim)

    async def _follow(
        self, job: trio.Nursery, budget: list[int], layer: Layer, entry: int, depth: int
    ) -> None:
        deps = await self._deps(layer, entry)
        if deps is None:
            return
        origin = os.path.dirname(os.fsencode(layer.index.path(entry)))
        for found in self._resolve_all(layer, deps, origin):
            if budget[0] <= 0:
                return
            if self._mark_seen(*found):
                budget[0] -= 1
                job.start_soon(self._file, job, budget, found[0], found[1], depth + 1)

    async def _deps(self, layer: Layer, entry: int) -> ElfDeps | None:
        """The file's ELF dependencies, read through the fetcher (cache, flights, checks)."""
        size = layer.index.attr(entry).size
        head = await self._fetcher.read(layer, entry, 0, min(size, HEAD_BYTES))
        header = parse_header(head)
        if header is None:
            return None
        # The ranges ``deps_from`` will ask for, read ahead of it: the interpreter path and the
        # dynamic segment, then .dynstr, whose place only the dynamic segment tells.
        pieces: dict[tuple[int, int], bytes] = {}
        for wanted in (header.interp_range, header.dynamic_range):
            if wanted is not None:
                pieces[wanted] = await self._read(layer, entry, *wanted)
        if header.dynamic_range is not None:
            dynamic = parse_dynamic(header, pieces[header.dynamic_range])
            if dynamic.strtab_range is not None:
                strtab = dynamic.strtab_range
                pieces[strtab] = await self._read(layer, entry, *strtab)
        return deps_from(header, lambda offset, length: pieces.get((offset, length), b""))

    async def _read(self, layer: Layer, entry: int, offset: int, size: int) -> bytes:
        if size > _READ_LIMIT or offset >= layer.index.attr(entry).size:
            return b""
        return await self._fetcher.read(layer, entry, offset, size)

    # -- finding libraries -------------------------------------------------------------------

    def _resolve_all(self, layer: Layer, deps: ElfDeps, origin: bytes) -> Iterator[Found]:
        layers = self._search_order(layer)
        if deps.interpreter is not None:
            found = resolve_in(layers, deps.interpreter)
            if found is not None:
                yield found
        directories = [
            *(_expand_origin(path, origin) for path in deps.runpath),
            *library_dirs(deps.machine),
        ]
        for name in deps.needed:
            if b"/" in name:
                if name.startswith(b"/"):
                    found = resolve_in(layers, name)
                    if found is not None:
                        yield found
                continue
            for directory in directories:
                if directory is None:
                    continue
                found = resolve_in(layers, directory + b"/" + name)
                if found is not None:
                    yield found
                    break

    def _search_order(self, layer: Layer) -> list[Layer]:
        others = [other for other in self._layers() if other is not layer]
        others.sort(key=lambda other: abs(other.slot - layer.slot))
        return [layer, *others[: _MAX_LAYERS - 1]]


def library_dirs(machine: int) -> list[bytes]:
    """The loader's default search directories, multiarch first, as absolute paths."""
    triplet = _TRIPLETS.get(machine)
    multiarch = [] if triplet is None else [b"/lib/" + triplet, b"/usr/lib/" + triplet]
    return [*multiarch, *_PLAIN_DIRS]


def _expand_origin(path: bytes, origin: bytes) -> bytes | None:
    """A RUNPATH entry as an absolute path in the image; None for what cannot be known here
    ($LIB, $PLATFORM) or a relative entry (relative to the process's working directory)."""
    for token in (b"$ORIGIN", b"${ORIGIN}"):
        path = path.replace(token, b"/" + origin)
    if b"$" in path or not path.startswith(b"/"):
        return None
    return path


def resolve_in(layers: Sequence[Layer], path: bytes) -> Found | None:
    """The regular file at absolute ``path`` in the union of ``layers`` (first wins), symlinks
    followed across layers; None if it is not there. Whiteouts are not looked at: this only
    chooses what to prefetch."""
    return _resolve(layers, path, [_MAX_SYMLINKS, _MAX_STEPS])


def _resolve(layers: Sequence[Layer], path: bytes, limits: list[int]) -> Found | None:
    for layer in layers:
        outcome = _walk(layer.index, path, limits)
        if isinstance(outcome, bytes):  # a symlink: the rest of the path goes on from there
            limits[0] -= 1
            if limits[0] < 0:
                return None
            return _resolve(layers, outcome, limits)
        if outcome is not None:
            return layer, outcome
        if limits[1] < 0:
            return None
    return None


def _walk(index: LayerIndex, path: bytes, limits: list[int]) -> int | bytes | None:
    """In one layer: the entry of the regular file at ``path``, None if this layer does not
    have it, or the absolute path to resolve instead when a symlink is met on the way."""
    parts = [part for part in path.split(b"/") if part and part != b"."]
    current = 0
    trail: list[bytes] = []  # the directories walked, for a relative symlink target
    for position, name in enumerate(parts):
        limits[1] -= 1
        if limits[1] < 0:
            return None
        if name == b"..":
            current = index.parent(current) if current else 0
            trail = trail[:-1]
            continue
        if index.attr(current).kind != EntryKind.DIR:
            return None
        child = index.lookup(current, name)
        if child is None:
            return None
        kind = index.attr(child).kind
        if kind == EntryKind.SYMLINK:
            target = index.readlink(child)
            base = b"" if target.startswith(b"/") else b"/" + b"/".join(trail)
            rest = b"/".join(parts[position + 1 :])
            return base + b"/" + target + (b"/" + rest if rest else b"")
        trail.append(name)
        current = child
    if current == 0 or index.attr(current).kind != EntryKind.REG:
        return None
    return current

