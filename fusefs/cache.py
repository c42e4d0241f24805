"""The on-disk chunk cache: content-addressed, verified, size-capped with LRU eviction.

A chunk with a ``chunkDigest`` is stored under that digest, so an identical chunk in two layers
is stored once. A chunk without one is keyed by (blob digest, position) and trusted only as far
as the whole-blob verification after background fetch goes.

Every file is written to a temporary name and renamed into place, so a crash leaves either the
whole chunk or nothing (leftover temporaries are removed at open). Content is checked against its
digest when stored and again when loaded: a mismatch is never returned (it raises
``ChunkIntegrityError`` on store; a corrupt file on disk is deleted and counted as a miss).

A chunk larger than one block (``fusefs.chunk_blocks``) can also be read in part
(``load_range``): the digests of its blocks are taken, in memory only, from bytes that have just
matched the chunk's digest (when it is stored, or on its first whole load after a restart), and
a part read later is checked block by block against them. A read of 128 KiB of a 64 MiB chunk
then reads and hashes 1 MiB, not 64 MiB, and still never returns bytes that changed on disk.

The LRU order lives in memory (one small dict entry per cached chunk) and in file mtimes, which
loads refresh, so the order survives a restart. Disk I/O runs on worker threads; the bookkeeping
only ever runs on the trio thread.

Owners (attached layers) register the keys of their chunks; the cache then keeps each owner's
``cached_bytes`` current whenever an entry appears or goes (store, eviction, corruption, garbage
collection), so reporting it is O(1). A key shared by several owners (content-addressed chunks
of two layers, or a chunk repeated inside one layer) counts for every registration, as a walk
over each layer's chunk list would.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from fusefs.chunk_blocks import block_digests, blocks_match, covering_blocks, has_blocks
from fusefs.digest import sha256_hex
from fusefs.index import ChunkRef

log = logging.getLogger(__name__)

_KEY = re.compile(r"(sha256-[0-9a-f]{64}|blob-[0-9a-f]{64}-\d+-\d+-\d+)\Z")
_TMP_PREFIX = ".tmp-"


class ChunkIntegrityError(Exception):
    """Chunk bytes do not match the digest the TOC promised."""


@dataclass(frozen=True, slots=True)
class CacheUsage:
    bytes: int
    chunks: int
    capacity_bytes: int
    hits: int
    misses: int
    stores: int
    evictions: int
    verify_failures: int
    evicted_bytes: int = 0


class CacheOwner(Protocol):
    """Something whose chunks the cache counts: ``cached_bytes`` is kept by the cache."""

    cached_bytes: int


# Keys as the owner map stores them: 32 raw bytes for a content digest (half the size of the key
# string; the map holds one per distinct chunk of every tracked layer), the key itself otherwise.
def _owner_id(key: str) -> bytes:
    if key.startswith("sha256-"):
        return bytes.fromhex(key[7:])
    return key.encode()


def blob_key_prefix(blob_digest: str) -> str:
    """The prefix shared by every digest-less chunk key of one blob (see ``chunk_key``)."""
    return "blob-" + hashlib.sha256(blob_digest.encode()).hexdigest() + "-"


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; ValueError for anything else."""
    hexpart = sha256_hex(digest)
    if hexpart is None:
        raise ValueError(f"unsupported or malformed digest: {digest!r}")
    return hexpart


def chunk_key(ref: ChunkRef, blob_digest: str) -> str:
    """The cache key of a chunk: its content digest, or its place in the blob when it has none."""
    if ref.digest is not None:
        return "sha256-" + digest_hex(ref.digest)
    # Hash the blob digest rather than parse it, so any algorithm name gives a safe file name.
    return f"{blob_key_prefix(blob_digest)}{ref.blob_offset}-{ref.inner_offset}-{ref.size}"


def verify_chunk(data: bytes | memoryview, expected_digest: str | None) -> None:
    """Raise ChunkIntegrityError unless ``data`` hashes to ``expected_digest`` (None: no check)."""
    if expected_digest is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest_hex(expected_digest):
        raise ChunkIntegrityError(
            f"chunk digest mismatch: expected {expected_digest}, got sha256:{actual}"
        )


def _write_new_file(path: str, data: bytes) -> None:
    """Create ``path``, which must not exist, holding ``data``: a raw descriptor written whole,
    with no buffered file object or ``Path`` on the way (chunk-file writes were a quarter of the
    daemon's py-spy samples in benchmarks/scale.py's CRI arm). The shard directory is made only
    when it is missing, so once per shard: a mkdir before every write was a fifth of the chunk
    writers' samples there before."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class ChunkCache:
    """A directory of verified chunks with a byte budget; open it with ``await ChunkCache.open``."""

    def __init__(self, directory: Path, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("cache capacity must be positive")
        self._dir = directory
        self._dir_name = os.fspath(directory)
        # Temporary file names: this process's random tag and a counter (``next`` on it is one
        # step under the GIL, so writer threads never share a number).
        self._tmp_prefix = f"{_TMP_PREFIX}{secrets.token_hex(6)}-"
        self._tmp_numbers = itertools.count()
        self._capacity = capacity_bytes
        self._entries: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._verify_failures = 0
        # key id -> its owner, or a list with one item per registration when there are several.
        self._owners: dict[bytes, CacheOwner | list[CacheOwner]] = {}
        self._owner_refs: dict[CacheOwner, int] = {}  # registrations per owner
        self._loading: dict[str, int] = {}  # keys being read right now: GC leaves them alone
        # Block digests of big chunks (see ``load_range``), taken from verified bytes only. A
        # worker thread may add one (``write_verified``): a key's content never changes, so any
        # digests recorded for it describe what the file must hold.
        self._blocks: dict[str, bytes] = {}

    @classmethod
    async def open(cls, directory: Path, *, capacity_bytes: int) -> ChunkCache:
        cache = cls(directory, capacity_bytes)
        found = await trio.to_thread.run_sync(cache._scan_sync)
        for _mtime, key, size in sorted(found):
            cache._entries[key] = size
            cache._bytes += size
        await cache._evict_over_capacity()
        log.info(
            "chunk cache opened dir=%s chunks=%d bytes=%d capacity=%d",
            directory,
            len(cache._entries),
            cache._bytes,
            capacity_bytes,
        )
        return cache

    @property
    def directory(self) -> Path:
        return self._dir

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def usage(self) -> CacheUsage:
        return CacheUsage(
            bytes=self._bytes,
            chunks=len(self._entries),
            capacity_bytes=self._capacity,
            hits=self._hits,
            misses=self._misses,
            stores=self._stores,
            evictions=self._evictions,
            verify_failures=self._verify_failures,
            evicted_bytes=self._evicted_bytes,
        )

    async def load(self, key: str, expected_digest: str | None) -> bytes | None:
        """The chunk's bytes, or None when absent or found corrupt (then it is deleted)."""
        if key not in self._entries:
            self._misses += 1
            return None
        with self._being_loaded(key):
            data, corrupt = await trio.to_thread.run_sync(self._load_sync, key, expected_digest)
        if data is None:
            self._forget(key)
            self._misses += 1
            if corrupt:
                self._verify_failures += 1
            return None
        if has_blocks(len(data)) and key in self._entries and key not in self._blocks:
            # Hashing again here costs one pass, once; every later part read saves a whole one.
            self._blocks[key] = await trio.to_thread.run_sync(block_digests, data)
        self._hits += 1
        if key in self._entries:
            self._entries.move_to_end(key)
        return data

    async def load_range(self, key: str, size: int, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the cached chunk ``key`` of ``size`` bytes, each block read
        checked against its recorded digest. None when the chunk is not cached, its block
        digests are not known yet (load it whole once), or a block does not match (the file is
        then deleted); the caller then goes the usual way."""
        digests = self._blocks.get(key)
        if digests is None or self._entries.get(key) != size:
            return None
        first, last = covering_blocks(start, end)
        last = min(last, size)
        with self._being_loaded(key):
            data, corrupt = await trio.to_thread.run_sync(
                self._load_blocks_sync, key, first, last, digests
            )
        if data is None:
            self._forget(key)
            if corrupt:
                self._verify_failures += 1
            return None
        self._hits += 1
        if key in self._entries:
            self._entries.move_to_end(key)
        return data[start - first : end - first]

    @contextlib.contextmanager
    def _being_loaded(self, key: str) -> Iterator[None]:
        self._loading[key] = self._loading.get(key, 0) + 1
        try:
            yield
        finally:
            if self._loading[key] == 1:
                del self._loading[key]
            else:
                self._loading[key] -= 1

    def write_verified(self, key: str, data: bytes, expected_digest: str | None) -> None:
        """Verify and write one chunk; safe to call from a worker thread. Call ``commit`` after.

        Raises ChunkIntegrityError (nothing is written) when the digest does not match.
        """
        try:
            verify_chunk(data, expected_digest)
        except ChunkIntegrityError:
            self._verify_failures += 1  # a plain int add: the GIL makes this safe enough
            raise
        # ``data`` matched its digest above or when it was decoded: the source of block digests.
        blocks = block_digests(data) if has_blocks(len(data)) else None
        # One new file per chunk, renamed into place once written: a crash leaves a whole chunk
        # or a temporary file (removed at open), never a short chunk under its key.
        path = self._path_name(key)
        tmp = f"{os.path.dirname(path)}/{self._tmp_prefix}{next(self._tmp_numbers)}"
        try:
            _write_new_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            # A full disk fails every write: leave no partial file behind for each one.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if blocks is not None:
            self._blocks[key] = blocks

    async def commit(self, key: str, size: int) -> None:
        """Record a chunk written by ``write_verified`` and evict least recently used ones."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = size
        self._bytes += size
        self._stores += 1
        self._count(key, size)
        await self._evict_over_capacity()

    async def store(self, key: str, data: bytes, expected_digest: str | None) -> None:
        await trio.to_thread.run_sync(self.write_verified, key, data, expected_digest)
        await self.commit(key, len(data))

    # -- owners (per-layer cached bytes) ------------------------------------------------------

    def add_owner(self, key: str, owner: CacheOwner) -> None:
        """Register one reference of ``owner`` to ``key``; counts the entry if it is cached."""
        ident = _owner_id(key)
        held = self._owners.get(ident)
        if held is None:
            self._owners[ident] = owner
        elif isinstance(held, list):
            held.append(owner)
        else:
            self._owners[ident] = [held, owner]
        self._owner_refs[owner] = self._owner_refs.get(owner, 0) + 1
        size = self._entries.get(key)
        if size is not None:
            owner.cached_bytes += size

    def remove_owner(self, key: str, owner: CacheOwner) -> None:
        """Undo one ``add_owner(key, owner)``; unknown registrations are ignored."""
        ident = _owner_id(key)
        held = self._owners.get(ident)
        if isinstance(held, list):
            if owner not in held:
                return
            held.remove(owner)
            if len(held) == 1:
                self._owners[ident] = held[0]
        elif held is owner:
            del self._owners[ident]
        else:
            return
        refs = self._owner_refs[owner] - 1
        if refs:
            self._owner_refs[owner] = refs
        else:
            del self._owner_refs[owner]
        size = self._entries.get(key)
        if size is not None:
            owner.cached_bytes -= size

    def owners(self) -> list[CacheOwner]:
        """Every owner holding at least one registration."""
        return list(self._owner_refs)

    def _count(self, key: str, delta: int) -> None:
        """An entry appeared (``delta`` = its size) or went (``-size``): tell its owners."""
        if not self._owners:
            return
        held = self._owners.get(_owner_id(key))
        if held is None:
            return
        if isinstance(held, list):
            for owner in held:
                owner.cached_bytes += delta
        else:
            held.cached_bytes += delta

    # -- garbage collection ------------------------------------------------------------------

    async def collect_garbage(
        self,
        live_owners: Callable[[], Collection[CacheOwner]],
        *,
        keep_content_addressed: bool = False,
        keep_blob_digests: Iterable[str] = (),
        step: int = 4096,
    ) -> tuple[int, int]:
        """Remove every entry no live owner has registered; return (chunks, bytes) removed.

        ``live_owners`` is called before each step of ``step`` entries, on the trio thread, and
        must return the owners whose registrations protect entries, all of them complete: an
        owner appearing while the collection runs is then seen before the next decision.
        ``keep_content_addressed`` keeps every ``sha256-`` entry and ``keep_blob_digests`` every
        digest-less entry of those blobs (layers whose chunk lists are unknown). Entries being
        loaded are kept. Decisions and bookkeeping happen here; files are unlinked on a worker
        thread, as eviction does.
        """
        keep_prefixes = tuple(blob_key_prefix(d) for d in keep_blob_digests)
        candidates = list(self._entries)
        removed = 0
        removed_bytes = 0
        for start in range(0, len(candidates), step):
            live = set(live_owners())
            victims: list[str] = []
            for key in candidates[start : start + step]:
                if key not in self._entries or key in self._loading:
                    continue
                if key.startswith("sha256-"):
                    if keep_content_addressed:
                        continue
                elif key.startswith(keep_prefixes):
                    continue
                held = self._owners.get(_owner_id(key))
                if held is not None:
                    if isinstance(held, list):
                        if any(owner in live for owner in held):
                            continue
                    elif held in live:
                        continue
                size = self._entries[key]
                self._forget(key)
                victims.append(key)
                removed += 1
                removed_bytes += size
            if victims:
                await trio.to_thread.run_sync(self._unlink_sync, victims)
            else:
                await trio.lowlevel.checkpoint()
        return removed, removed_bytes

    # -- internals ---------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return Path(self._path_name(key))

    def _path_name(self, key: str) -> str:
        if _KEY.match(key) is None:
            raise ValueError(f"malformed cache key: {key!r}")
        # Fan out by the first hex digits so no directory grows huge.
        shard = key.split("-", 2)[1][:2]
        return f"{self._dir_name}/{shard}/{key}"

    def _forget(self, key: str) -> None:
        size = self._entries.pop(key, None)
        self._blocks.pop(key, None)
        if size is not None:
            self._bytes -= size
            self._count(key, -size)

    async def _evict_over_capacity(self) -> None:
        victims: list[str] = []
        while self._bytes > self._capacity and self._entries:
            key, size = self._entries.popitem(last=False)
            self._blocks.pop(key, None)
            self._bytes -= size
            self._evictions += 1
            self._evicted_bytes += size
            self._count(key, -size)
            victims.append(key)
        if victims:
            await trio.to_thread.run_sync(self._unlink_sync, victims)

    def _unlink_sync(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def _load_sync(self, key: str, expected_digest: str | None) -> tuple[bytes | None, bool]:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, False
        try:
            verify_chunk(data, expected_digest)
        except ChunkIntegrityError as exc:
            log.error("corrupt cached chunk removed key=%s error=%s", key, exc,
                      extra={"event": "cache_chunk_corrupt"})
            path.unlink(missing_ok=True)
            return None, True
        # The mtime is the LRU order after a restart.
        os.utime(path)
        return data, False

    def _load_blocks_sync(
        self, key: str, first: int, last: int, digests: bytes
    ) -> tuple[bytes | None, bool]:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), last - first, first)
        except FileNotFoundError:
            return None, False
        if not blocks_match(data, first, last, digests):
            log.error("corrupt cached chunk removed key=%s error=block digest mismatch", key,
                      extra={"event": "cache_chunk_corrupt"})
            path.unlink(missing_ok=True)
            return None, True
        # The mtime is the LRU order after a restart.
        os.utime(path)
        return data, False

    def _scan_sync(self) -> list[tuple[int, str, int]]:
        self._dir.mkdir(parents=True, exist_ok=True)
        found: list[tuple[int, str, int]] = []
        for shard in self._dir.iterdir():
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if entry.name.startswith(_TMP_PREFIX):
                    os.unlink(entry.path)  # a write interrupted by a crash
                    continue
                if _KEY.match(entry.name) is None or not entry.is_file():
                    continue
                st = entry.stat()
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        return found
