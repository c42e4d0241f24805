"""One attached layer: its blob, its index, its counters, and compact per-entry bookkeeping.

Nothing here is per-entry Python objects: the "already read" marks are a bit array and the
position of each file in blob order is an ``array`` built on the first cache miss.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from fusefs.blob import BlobReader
from fusefs.cache import ChunkCache, chunk_key
from fusefs.held_bytes import HeldBytes
from fusefs.index import ChunkRef, LayerIndex
from fusefs.stats import LayerMeters

log = logging.getLogger(__name__)

ChunkTag = tuple[int, int]  # entry id, then chunk number within the file

_MAX_LOGGED_ERRORS = 1000


@dataclass(slots=True)
class LayerStats:
    """Counters of one layer, reported through ``LazyFilesystem.usage``."""

    fetched_bytes: int = 0
    requests: int = 0
    errors: int = 0
    verify_failures: int = 0
    background_done: bool = False
    held_bytes_reused: int = 0  # bytes the blob check read back from readers' fetches
    blob_verified: bool | None = None  # None until the whole blob has been read and hashed
    last_error: str | None = None  # the latest failure counted in ``errors``, for status
    meters: LayerMeters = field(default_factory=LayerMeters)
    logged: set[tuple[str, int, str]] = field(default_factory=set)


_attach_orders = itertools.count()


class Layer:
    """The filesystem's view of one attached layer; only its counters change."""

    __slots__ = (
        "_access_marks",
        "_by_blob_offset",
        "_file_positions",
        "_file_sequence",
        "_read_marks",
        "_tracked_cache",
        "_tracked_files",
        "attach_order",
        "blob",
        "cached_bytes",
        "held",
        "index",
        "layer_id",
        "slot",
        "stats",
    )

    def __init__(self, layer_id: str, slot: int, blob: BlobReader, index: LayerIndex) -> None:
        self.layer_id = layer_id
        self.slot = slot
        self.blob = blob
        self.index = index
        self.stats = LayerStats()
        # Layers made earlier come first for the node's background fetch budget.
        self.attach_order = next(_attach_orders)
        # Compressed bytes readers fetched, kept for the whole-blob check of a zTOC layer.
        self.held: HeldBytes | None = None
        self._read_marks = bytearray((index.entry_count + 7) // 8)
        self._access_marks: bytearray | None = None  # only with an access log
        self._file_positions: array[int] | None = None
        self._file_sequence: Sequence[int] | None = None
        self._by_blob_offset: dict[int, list[tuple[ChunkTag, ChunkRef]]] | None = None
        # Bytes of this layer's chunks in the cache, kept by the cache once the layer's chunks
        # are registered there (``track_cached_bytes``); meaningful only when that is complete.
        self.cached_bytes = 0
        self._tracked_cache: ChunkCache | None = None
        self._tracked_files = 0  # files of ``index.file_entries()`` registered so far

    @property
    def digest(self) -> str:
        return self.blob.digest

    def mark_read(self, entry: int) -> bool:
        """Mark ``entry`` as read by the fetcher; True the first time."""
        return _set_bit(self._read_marks, entry)

    def mark_accessed(self, entry: int) -> bool:
        """Mark ``entry`` as seen by the access log; True the first time."""
        if self._access_marks is None:
            self._access_marks = bytearray(len(self._read_marks))
        return _set_bit(self._access_marks, entry)

    def chunks_after(self, entry: int, number: int) -> Iterator[tuple[ChunkTag, ChunkRef]]:
        """Chunks in blob order after chunk ``number`` of ``entry``: the rest of the file, then
        the following files. Lazy: the range planner stops pulling when its range is full."""
        chunks = self.index.chunks(entry)
        for k in range(number + 1, len(chunks)):
            yield (entry, k), chunks[k]
        sequence, positions = self._blob_order()
        if entry >= len(positions) or positions[entry] < 0:
            return
        for pos in range(positions[entry] + 1, len(sequence)):
            following = sequence[pos]
            for k, ref in enumerate(self.index.chunks(following)):
                yield (following, k), ref

    def all_chunks(self) -> Iterator[tuple[ChunkTag, ChunkRef]]:
        """Every chunk of the layer in blob order, for prefetch and background fetch."""
        sequence, _ = self._blob_order()
        for entry in sequence:
            for k, ref in enumerate(self.index.chunks(entry)):
                yield (entry, k), ref

    def chunks_starting_at(self, blob_offset: int) -> Sequence[tuple[ChunkTag, ChunkRef]]:
        """The chunks whose compressed bytes start at ``blob_offset``: the files' shares of one
        zTOC span. Built on the first call, one walk over the chunks."""
        if self._by_blob_offset is None:
            by_offset: dict[int, list[tuple[ChunkTag, ChunkRef]]] = {}
            for tag, ref in self.all_chunks():
                if not ref.zeros:
                    by_offset.setdefault(ref.blob_offset, []).append((tag, ref))
            self._by_blob_offset = by_offset
        return self._by_blob_offset.get(blob_offset, ())

    def track_cached_bytes(self, cache: ChunkCache, budget: int | None = None) -> bool:
        """Register this layer's chunks with ``cache``, which then keeps ``cached_bytes``
        current; True once every chunk is registered.

        Resumable: each call goes on from where the last one stopped, after registering about
        ``budget`` chunks, or all the rest for None. So a caller can spread the one O(chunks) walk
        over several trio steps. Each file is registered whole within one call, so concurrent
        callers on the trio thread never register a file twice.
        """
        if self._tracked_cache is not cache:
            # A new cache means the filesystem ran again: start over; the old one is gone.
            self._tracked_cache = cache
            self._tracked_files = 0
            self.cached_bytes = 0
        files = self.index.file_entries()
        done = 0
        while self._tracked_files < len(files):
            if budget is not None and done >= budget:
                return False
            for ref in self.index.chunks(files[self._tracked_files]):
                if not ref.zeros:  # zeros are never fetched nor cached
                    cache.add_owner(chunk_key(ref, self.digest), self)
                done += 1
            self._tracked_files += 1
        return True

    def untrack_cached_bytes(self, budget: int | None = None) -> bool:
        """Withdraw what ``track_cached_bytes`` registered; True when nothing is left.

        The layer was detached, and its registrations must neither keep chunks from garbage
        collection nor hold its index in memory. Resumable like ``track_cached_bytes``."""
        cache = self._tracked_cache
        if cache is None:
            return True
        files = self.index.file_entries()
        done = 0
        while self._tracked_files > 0:
            if budget is not None and done >= budget:
                return False
            self._tracked_files -= 1
            for ref in self.index.chunks(files[self._tracked_files]):
                if not ref.zeros:
                    cache.remove_owner(chunk_key(ref, self.digest), self)
                done += 1
        self._tracked_cache = None
        self.cached_bytes = 0
        return True

    def should_log(self, operation: str, entry: int, error: BaseException) -> bool:
        """Each operation, entry and error type is logged once, so a failing file cannot flood."""
        key = (operation, entry, type(error).__name__)
        if key in self.stats.logged or len(self.stats.logged) >= _MAX_LOGGED_ERRORS:
            return False
        self.stats.logged.add(key)
        return True

    def _blob_order(self) -> tuple[Sequence[int], array[int]]:
        if self._file_positions is None or self._file_sequence is None:
            sequence = self.index.file_entries()
            positions = array("i", [-1]) * self.index.entry_count
            for pos, entry in enumerate(sequence):
                positions[entry] = pos
            self._file_sequence = sequence
            self._file_positions = positions
        return self._file_sequence, self._file_positions


def _set_bit(bits: bytearray, number: int) -> bool:
    byte, bit = divmod(number, 8)
    mask = 1 << bit
    if bits[byte] & mask:
        return False
    bits[byte] |= mask
    return True


def _file_offset(ref: ChunkRef) -> int:
    return ref.file_offset


def chunk_at(chunks: Sequence[ChunkRef], file_offset: int) -> int:
    """The number of the chunk holding byte ``file_offset``; a file's chunks cover it."""
    return max(0, bisect.bisect_right(chunks, file_offset, key=_file_offset) - 1)
