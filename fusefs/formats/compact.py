"""A LayerIndex kept in flat arrays: a few bytes per entry, objects built only on demand.

Layout (all arrays indexed by entry id unless stated otherwise):

* attributes: ``kind``, ``mode``, ``uid``, ``gid``, ``size``, ``mtime_ns``, ``rdev``, ``nlink``;
* tree: ``parent`` and ``name_dirent`` (the entry's first name); a directory's children are the
  dirents ``[dir_start, dir_start + dir_count)``, sorted by name for binary-search lookup. Dirent
  arrays (``dirent_*``) are indexed by dirent number; names live in one ``names`` blob;
* symlink targets live in one ``links`` blob (``link_off``/``link_len``);
* chunks: an entry's chunks are ``[chunk_start, chunk_start + chunk_count)`` of the ``chunk_*``
  arrays; digests are 32 raw bytes each in ``chunk_digests``;
* xattrs: for the few entries that have any, a sorted ``xattr_entries`` array and, per such
  entry, a record range in ``xattr_data`` (``<HI`` name and value lengths, name, value).
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, fields

from fusefs.index import ChunkRef, Codec, EntryAttr, EntryKind

_XATTR_HEADER = struct.Struct("<HI")

CHUNK_HAS_DIGEST = 1
CHUNK_ZEROS = 2
DIGEST_SIZE = 32


def encode_xattrs(pairs: tuple[tuple[bytes, bytes], ...]) -> bytes:
    return b"".join(_XATTR_HEADER.pack(len(k), len(v)) + k + v for k, v in pairs)


def decode_xattrs(data: bytes, start: int, end: int) -> dict[bytes, bytes]:
    found = {}
    pos = start
    while pos < end:
        name_len, value_len = _XATTR_HEADER.unpack_from(data, pos)
        pos += _XATTR_HEADER.size
        name = data[pos : pos + name_len]
        pos += name_len
        found[name] = data[pos : pos + value_len]
        pos += value_len
    return found


@dataclass(slots=True)
class IndexArrays:
    """The storage of a CompactLayerIndex; the builder fills it, the index only reads it."""

    kind: array[int]
    mode: array[int]
    uid: array[int]
    gid: array[int]
    size: array[int]
    mtime_ns: array[int]
    rdev: array[int]
    nlink: array[int]
    parent: array[int]
    name_dirent: array[int]
    dir_start: array[int]
    dir_count: array[int]
    link_off: array[int]
    link_len: array[int]
    chunk_start: array[int]
    chunk_count: array[int]
    dirent_name_off: array[int]
    dirent_name_len: array[int]
    dirent_target: array[int]
    names: bytes
    links: bytes
    chunk_file_offset: array[int]
    chunk_size: array[int]
    chunk_blob_offset: array[int]
    chunk_blob_end: array[int]
    chunk_inner_offset: array[int]
    chunk_flags: array[int]
    chunk_digests: bytes
    xattr_entries: array[int]
    xattr_offsets: array[int]  # len(xattr_entries) + 1 boundaries into xattr_data
    xattr_data: bytes
    file_order: array[int]


class CompactLayerIndex:
    """The LayerIndex of one validated TOC (see ``fusefs.index.LayerIndex``)."""

    __slots__ = ("_a", "_codec", "_prefetch_end", "_toc_digest")

    def __init__(
        self, arrays: IndexArrays, *, codec: Codec, toc_digest: str, prefetch_end: int | None
    ) -> None:
        self._a = arrays
        self._codec = codec
        self._toc_digest = toc_digest
        self._prefetch_end = prefetch_end

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def entry_count(self) -> int:
        return len(self._a.kind)

    @property
    def toc_digest(self) -> str:
        return self._toc_digest

    @property
    def prefetch_end(self) -> int | None:
        return self._prefetch_end

    def _check(self, entry: int) -> None:
        if not 0 <= entry < len(self._a.kind):
            raise KeyError(f"no entry {entry}")

    def attr(self, entry: int) -> EntryAttr:
        self._check(entry)
        a = self._a
        return EntryAttr(
            kind=EntryKind(a.kind[entry]),
            mode=a.mode[entry],
            uid=a.uid[entry],
            gid=a.gid[entry],
            size=a.size[entry],
            mtime_ns=a.mtime_ns[entry],
            rdev=a.rdev[entry],
            nlink=a.nlink[entry],
        )

    def _dirent_name(self, dirent: int) -> bytes:
        a = self._a
        start = a.dirent_name_off[dirent]
        return a.names[start : start + a.dirent_name_len[dirent]]

    def lookup(self, parent: int, name: bytes) -> int | None:
        self._check(parent)
        a = self._a
        if a.kind[parent] != EntryKind.DIR:
            return None
        lo = a.dir_start[parent]
        hi = lo + a.dir_count[parent]
        while lo < hi:  # binary search over the directory's name-sorted dirents
            mid = (lo + hi) // 2
            candidate = self._dirent_name(mid)
            if candidate < name:
                lo = mid + 1
            elif candidate > name:
                hi = mid
            else:
                return a.dirent_target[mid]
        return None

    def children(self, directory: int) -> Sequence[tuple[bytes, int]]:
        self._check(directory)
        a = self._a
        if a.kind[directory] != EntryKind.DIR:
            return ()
        start = a.dir_start[directory]
        return [
            (self._dirent_name(d), a.dirent_target[d])
            for d in range(start, start + a.dir_count[directory])
        ]

    def parent(self, entry: int) -> int:
        self._check(entry)
        return self._a.parent[entry]

    def name(self, entry: int) -> bytes:
        """The entry's own (first) name; b"" for the root."""
        self._check(entry)
        if entry == 0:
            return b""
        return self._dirent_name(self._a.name_dirent[entry])

    def path(self, entry: int) -> str:
        parts: list[bytes] = []
        while entry != 0:
            parts.append(self.name(entry))
            entry = self._a.parent[entry]
        return b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    def readlink(self, entry: int) -> bytes:
        self._check(entry)
        a = self._a
        if a.kind[entry] != EntryKind.SYMLINK:
            raise KeyError(f"entry {entry} is not a symlink")
        start = a.link_off[entry]
        return a.links[start : start + a.link_len[entry]]

    def xattrs(self, entry: int) -> dict[bytes, bytes]:
        self._check(entry)
        a = self._a
        slot = bisect.bisect_left(a.xattr_entries, entry)
        if slot == len(a.xattr_entries) or a.xattr_entries[slot] != entry:
            return {}
        return decode_xattrs(a.xattr_data, a.xattr_offsets[slot], a.xattr_offsets[slot + 1])

    def chunks(self, entry: int) -> Sequence[ChunkRef]:
        self._check(entry)
        a = self._a
        start = a.chunk_start[entry]
        return [self._chunk(c) for c in range(start, start + a.chunk_count[entry])]

    def _chunk(self, c: int) -> ChunkRef:
        a = self._a
        flags = a.chunk_flags[c]
        digest = None
        if flags & CHUNK_HAS_DIGEST:
            raw = a.chunk_digests[c * DIGEST_SIZE : (c + 1) * DIGEST_SIZE]
            digest = "sha256:" + raw.hex()
        return ChunkRef(
            file_offset=a.chunk_file_offset[c],
            size=a.chunk_size[c],
            blob_offset=a.chunk_blob_offset[c],
            blob_end=a.chunk_blob_end[c],
            inner_offset=a.chunk_inner_offset[c],
            digest=digest,
            zeros=bool(flags & CHUNK_ZEROS),
        )

    def file_entries(self) -> Sequence[int]:
        return self._a.file_order

    def memory_bytes(self) -> int:
        """Approximate bytes held by the index's arrays and blobs (for benchmarks)."""
        total = 0
        for value in (getattr(self._a, f.name) for f in fields(IndexArrays)):
            if isinstance(value, array):
                total += value.itemsize * len(value)
            elif isinstance(value, bytes):
                total += len(value)
        return total
