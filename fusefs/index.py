"""The contract between the layer formats and the filesystem: a read-only, compact layer index.

A format parser (``fusefs.formats``) turns a TOC into an object satisfying ``LayerIndex``; the
FUSE operations only ever talk to that protocol. Entry ids are dense integers ``0..count-1`` in
TOC order, entry 0 is the root directory, and they are stable for a given TOC: the filesystem
derives inode numbers from them and the layer slot, so a restarted daemon computes the same
numbers. ``fusefs.inodes`` has the rule.

Hardlinks are resolved by the index: a hardlink name maps to the id of its target entry, which
is the same inode, and its ``nlink`` counts every name. Overlay whiteouts are already
translated: a TOC name ``.wh.<name>`` appears as entry ``<name>`` of kind CHAR with rdev 0, and
``.wh..wh..opq`` is not an entry but the opaque xattr on its directory.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class EntryKind(enum.IntEnum):
    DIR = 1
    REG = 2
    SYMLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6


class Codec(enum.Enum):
    GZIP = "gzip"  # eStargz
    ZSTD = "zstd"  # zstd:chunked
    GZIP_SPANS = "gzip-spans"  # plain gzip with a SOCI zTOC: chunks inflate from checkpoints


@dataclass(frozen=True, slots=True)
class EntryAttr:
    """POSIX attributes of one entry, built on demand rather than stored per entry."""

    kind: EntryKind
    mode: int  # full st_mode: file type bits | permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int  # regular file: content size; symlink: target length; others 0
    mtime_ns: int
    rdev: int  # os.makedev(major, minor) for CHAR/BLOCK, else 0
    nlink: int


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One independently decodable piece of a regular file's content."""

    file_offset: int  # where the chunk's bytes start within the file
    size: int  # uncompressed length of the chunk
    blob_offset: int  # first compressed byte needed to decode it
    blob_end: int  # one past the last compressed byte needed (exclusive)
    inner_offset: int  # decompressed bytes to skip before the chunk starts (eStargz innerOffset)
    digest: str | None  # "sha256:<hex>" of the uncompressed chunk bytes, None if the TOC has none
    zeros: bool = False  # a zstd:chunked "zeros" chunk: ``size`` zero bytes, nothing in the blob


class LayerIndex(Protocol):
    """A validated, immutable view of one layer's file tree."""

    @property
    def codec(self) -> Codec: ...

    @property
    def entry_count(self) -> int: ...

    @property
    def toc_digest(self) -> str:
        """``sha256:<hex>`` of the uncompressed TOC JSON as stored in the blob."""
        ...

    @property
    def prefetch_end(self) -> int | None:
        """Blob offset of the ``.prefetch.landmark``, or None. Prefetch covers ``[0, end)``."""
        ...

    @property
    def toc_trusted(self) -> bool:
        """The TOC matched a digest given from outside the blob by a manifest annotation or a
        label, so its chunk digests can stand in for the blob digest."""
        ...

    def attr(self, entry: int) -> EntryAttr: ...

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The entry id of ``name`` inside directory ``parent``, or None."""
        ...

    def children(self, directory: int) -> Sequence[tuple[bytes, int]]:
        """Name and entry id pairs of a directory in a stable order, without "." and ".."."""
        ...

    def parent(self, entry: int) -> int:
        """The directory holding ``entry``; the root is its own parent."""
        ...

    def path(self, entry: int) -> str:
        """The entry's path relative to the layer root, e.g. ``usr/bin/env``; "" for the root."""
        ...

    def readlink(self, entry: int) -> bytes: ...

    def xattrs(self, entry: int) -> dict[bytes, bytes]: ...

    def chunks(self, entry: int) -> Sequence[ChunkRef]:
        """A regular file's chunks in file order, covering ``[0, size)`` without gaps."""
        ...

    def file_entries(self) -> Sequence[int]:
        """Ids of regular files with content, in blob order, for background fetch."""
        ...
