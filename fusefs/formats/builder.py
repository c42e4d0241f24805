"""Validate TOC entries and build a CompactLayerIndex from them (pure).

Both TOC schemas are read by one builder: eStargz's JTOC (also used by the legacy zstd:chunked
variant) and containers/storage's ``minimal.FileMetadata``. They share field names; the
differences are handled where they matter:

* eStargz writes ``chunkSize`` 0 on the last chunk and on unchunked files (we compute it);
  containers/storage writes chunk fields only for files with several chunks, and the whole-file
  ``digest`` then is the digest of the single chunk;
* containers/storage gives ``endOffset`` (end of a file's last payload frame); eStargz's
  compressed range of a chunk ends at the next different payload offset (or the TOC).

The per-entry path is written for speed (a 100k-entry TOC is parsed at attach time). Entries
arrive as ``TocEntry`` Structs whose field types and ranges msgspec checked in C when it decoded
them (``fusefs.formats.tocentry``); what is left here depends on the limits, on names and on
other entries.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import os
import stat
import sys
from array import array
from collections import Counter
from collections.abc import Iterable
from typing import Any

from fusefs.digest import sha256_raw
from fusefs.formats.compact import (
    CHUNK,
    CHUNK_BLOB_END,
    CHUNK_HAS_DIGEST,
    CHUNK_ZEROS,
    DIGEST_SIZE,
    ENTRY,
    ENTRY_CHUNK_COUNT,
    ENTRY_GID,
    ENTRY_MODE,
    ENTRY_MTIME,
    ENTRY_NAME_DIRENT,
    ENTRY_NLINK,
    ENTRY_UID,
    CompactLayerIndex,
    IndexArrays,
    encode_xattrs,
)
from fusefs.formats.errors import LayerFormatError
from fusefs.formats.limits import IndexLimits
from fusefs.formats.modtime import parse_modtime
from fusefs.formats.tocentry import TocEntry, entry_from_object
from fusefs.index import Codec, EntryKind

log = logging.getLogger(__name__)

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_LANDMARKS = frozenset({PREFETCH_LANDMARK.encode(), NO_PREFETCH_LANDMARK.encode()})
_WHITEOUT_PREFIX = b".wh."
_OPAQUE_MARKER = b".wh..wh..opq"
_AUFS_META_PREFIX = b".wh..wh."
OPAQUE_XATTR = (b"trusted.overlay.opaque", b"y")
# As containerd's unpacker, ignore trusted.* xattrs from an image: overlayfs reads its own
# trusted.overlay.* attributes (opaque, redirect, metacopy) from the lower layers. The only one
# we serve is the opaque marker derived from a .wh..wh..opq whiteout.
IMAGE_XATTR_DROPPED_PREFIX = b"trusted."
# The kernel reads a FUSE symlink target into one page with a terminating NUL: 4095 bytes at most,
# and a longer one would answer readlink with EIO.
MAX_SYMLINK_TARGET_BYTES = 4095

_DIR = EntryKind.DIR.value
_REG = EntryKind.REG.value
_SYMLINK = EntryKind.SYMLINK.value
_FIFO = EntryKind.FIFO.value
_KINDS = {
    "dir": EntryKind.DIR.value,
    "reg": EntryKind.REG.value,
    "symlink": EntryKind.SYMLINK.value,
    "char": EntryKind.CHAR.value,
    "block": EntryKind.BLOCK.value,
    "fifo": EntryKind.FIFO.value,
}
_TYPE_BITS = {
    EntryKind.DIR.value: stat.S_IFDIR,
    EntryKind.REG.value: stat.S_IFREG,
    EntryKind.SYMLINK.value: stat.S_IFLNK,
    EntryKind.CHAR.value: stat.S_IFCHR,
    EntryKind.BLOCK.value: stat.S_IFBLK,
    EntryKind.FIFO.value: stat.S_IFIFO,
}
_NO_DIGEST = bytes(DIGEST_SIZE)
_pack_entry = ENTRY.pack
_CHUNK_SIZE = CHUNK.size
_COUNT_CODEC, _COUNT_AT = ENTRY_CHUNK_COUNT

# A file's pending chunk: (chunkOffset, chunkSize field, offset, innerOffset, digest, zeros)
_Chunk = tuple[int, int, int, int, bytes | None, bool]


def _in_range(key: str, value: int, hi: int) -> int:
    """``value`` (typed and >= 0 already) when below ``hi``, a limit not known to the type."""
    if value >= hi:
        raise LayerFormatError(f"TOC field {key!r} = {value} is out of range")
    return value


def _digest(key: str, value: str | None) -> bytes | None:
    """The raw 32 bytes of a ``sha256:<hex>`` field, None when absent or empty."""
    if not value:
        return None
    raw = sha256_raw(value)
    if raw is None:
        raise LayerFormatError(f"TOC field {key!r} = {value!r} is not a sha256 digest")
    return raw


def split_name(name: str, limits: IndexLimits) -> list[bytes]:
    """A TOC name as path components; ``./``, leading ``/`` and trailing ``/`` are dropped."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise LayerFormatError(f"TOC name {name!r} is not encodable") from exc
    # Most writers prefix "./" and end directories with "/": cut those before splitting, so
    # that the common name needs no filtering pass (the filter below drops them anyway).
    stripped = raw[2:] if raw[:2] == b"./" else raw
    if stripped[-1:] == b"/":
        stripped = stripped[:-1]
    parts = stripped.split(b"/")
    if b"" in parts or b"." in parts:
        parts = [p for p in parts if p and p != b"."]
    if b".." in parts:
        raise LayerFormatError(f"TOC name {name!r} contains '..'")
    if b"\x00" in raw:
        raise LayerFormatError(f"TOC name {name!r} contains NUL")
    if len(raw) > limits.max_name_bytes:
        if len(raw) > limits.max_path_bytes:
            raise LayerFormatError(f"TOC name of {len(raw)} bytes is too long")
        if max(map(len, parts)) > limits.max_name_bytes:
            raise LayerFormatError("TOC name has a component that is too long")
    if len(parts) > limits.max_depth:
        raise LayerFormatError(f"TOC name {name!r} is nested too deeply")
    return parts


def _u32_column(records: bytearray, field: tuple[Any, int], *, first: int) -> memoryview:
    """One 32-bit field of every ENTRY record from record ``first`` on, as a strided view."""
    codec, offset = field
    assert codec.size == 4 and offset % 4 == 0 and ENTRY.size % 4 == 0
    stride = ENTRY.size // 4
    return memoryview(records).cast("I")[first * stride + offset // 4 :: stride]


def _read_u32(column: memoryview) -> array[int]:
    values = array("I", column)
    if sys.byteorder != "little":  # records are little-endian, the view is native
        values.byteswap()
    return values


def _write_u32(column: memoryview, values: array[int]) -> None:
    if sys.byteorder != "little":
        values.byteswap()
    column[:] = values


class _Builder:
    def __init__(
        self, codec: Codec, payload_end: int, limits: IndexLimits, *, chunk_digests: bool = True
    ) -> None:
        self.codec = codec
        self.chunk_digests_required = chunk_digests
        self.payload_end = payload_end
        self.limits = limits
        self.max_entries = limits.max_entries  # read once per entry
        self.kinds = bytearray()
        self.records = bytearray()
        self.implicit = bytearray()  # 1: a directory nobody has described yet
        self.links = bytearray()
        self.xattrs: dict[int, tuple[tuple[bytes, bytes], ...]] = {}
        self.opaque: set[int] = set()
        self.paths: dict[bytes, int] = {}
        self.dirent_parent = array("I")
        self.dirent_target = array("I")
        self.dirent_names: list[bytes] = []
        self.chunk_records = bytearray()
        self.chunk_digests = bytearray()
        self.payload_offsets = array("q")
        # Files with content to fetch and the blob offset of their first data chunk.
        self.fetch_offsets = array("q")
        self.fetch_entries = array("I")
        # The regular file whose chunk entries may follow: (entry or -1, name, size, digest,
        # endOffset, chunks).
        self.pending: tuple[int, str, int, str | None, int, list[_Chunk]] | None = None
        self.prefetch_end: int | None = None
        self.root_described = False
        self.mtimes: dict[str, int] = {}  # layers repeat a few timestamps: parse each once
        self._new_entry(_DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, -1, b"", 0, 0)
        self.implicit[0] = 1

    # --- entries ---------------------------------------------------------------------------

    def _modtime(self, value: str | None) -> int:
        if value is None:
            return 0
        parsed = self.mtimes.get(value)
        if parsed is None:
            parsed = parse_modtime(value)
            if len(self.mtimes) < 65536:
                self.mtimes[value] = parsed
        return parsed

    def _new_entry(
        self,
        kind: int,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        rdev: int,
        parent: int,
        name: bytes,
        link_off: int,
        link_len: int,
    ) -> int:
        kinds = self.kinds
        entry = len(kinds)
        if entry >= self.max_entries:
            raise LayerFormatError(
                f"layer has more than {self.max_entries} entries (incl. implied dirs)"
            )
        kinds.append(kind)
        self.implicit.append(0)
        # A file's chunks are appended right after it is added (before any other file's), so
        # its chunk range starts at the current end of the chunk records.
        self.records += _pack_entry(
            mode, uid, gid, size, mtime_ns, rdev, 1, parent if parent > 0 else 0,
            len(self.dirent_target), len(self.chunk_records) // _CHUNK_SIZE, 0, link_off, link_len,
        )  # fmt: skip
        if parent >= 0:
            self.dirent_parent.append(parent)
            self.dirent_target.append(entry)
            self.dirent_names.append(name)
        return entry

    def _set(self, field: tuple[Any, int], entry: int, value: int) -> None:
        codec, offset = field
        codec.pack_into(self.records, entry * ENTRY.size + offset, value)

    def _get(self, field: tuple[Any, int], entry: int) -> int:
        codec, offset = field
        value: int = codec.unpack_from(self.records, entry * ENTRY.size + offset)[0]
        return value

    def _directory(self, parts: list[bytes]) -> int:
        """The id of the directory ``parts``, creating implied directories as needed."""
        current = 0
        for depth in range(1, len(parts) + 1):
            key = b"/".join(parts[:depth])
            child = self.paths.get(key, -1)
            if child < 0:
                child = self._new_entry(
                    _DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, current, parts[depth - 1], 0, 0
                )
                self.implicit[child] = 1
                self.paths[key] = child
            elif self.kinds[child] != _DIR:
                raise LayerFormatError(f"{key!r} is used as a directory")
            current = child
        return current

    def _xattrs(self, entry: TocEntry) -> tuple[tuple[bytes, bytes], ...]:
        raw = entry.xattrs  # a dict of strings: its type is checked by the decoder
        if not raw:
            return ()
        if len(raw) > self.limits.max_xattrs_per_entry:
            raise LayerFormatError(f"entry has {len(raw)} xattrs, over the limit")
        pairs = []
        for key, value in raw.items():
            try:
                name = key.encode("utf-8", "surrogateescape")
                data = base64.b64decode(value, validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
                raise LayerFormatError(f"xattr {key!r} is not valid base64: {exc}") from exc
            if not name or b"\x00" in name or len(name) > self.limits.max_name_bytes:
                raise LayerFormatError(f"xattr name {key!r} is invalid")
            if len(data) > self.limits.max_xattr_value_bytes:
                raise LayerFormatError(f"xattr {key!r} value of {len(data)} bytes is too large")
            if name.startswith(IMAGE_XATTR_DROPPED_PREFIX):
                log.debug("dropping image xattr name=%r", name)
                continue
            pairs.append((name, data))
        return tuple(pairs)

    def add(self, entry: TocEntry) -> None:
        """One entry; its fields' types and ranges were checked when it was decoded."""
        typ = entry.type
        name = entry.name
        if typ == "chunk":
            self._add_chunk(entry, name)
            return
        if self.pending is not None:
            self._finish_file()
        parts = split_name(name, self.limits)
        if typ == "hardlink":
            self._add_hardlink(entry, parts)
            return
        kind = _KINDS.get(typ)
        if kind is None:
            raise LayerFormatError(f"unknown TOC entry type {typ!r}")
        uid = entry.uid
        gid = entry.gid
        mode = _TYPE_BITS[kind] | (entry.mode & 0o7777)
        modtime = entry.modtime
        mtime_ns = self.mtimes.get(modtime) if modtime is not None else 0
        if mtime_ns is None:
            mtime_ns = self._modtime(modtime)
        if not parts:
            if kind != _DIR or self.root_described:
                raise LayerFormatError("duplicate or non-directory root entry")
            self._describe_dir(0, mode, uid, gid, mtime_ns, self._xattrs(entry))
            self.root_described = True
            return
        base = parts[-1]
        if base[:1] == b"." and self._special(entry, kind, parts, uid, gid, mtime_ns):
            return
        key = b"/".join(parts)
        paths = self.paths
        if len(parts) == 1:
            parent = 0
        else:
            parent = paths.get(key[: -len(base) - 1], -1)
            if parent < 0 or self.kinds[parent] != _DIR:
                parent = self._directory(parts[:-1])
        existing = paths.get(key, -1)
        if existing >= 0:
            if kind == _DIR and self.implicit[existing]:
                self._describe_dir(existing, mode, uid, gid, mtime_ns, self._xattrs(entry))
                return
            raise LayerFormatError(f"duplicate TOC entry {name!r}")
        size = 0
        rdev = 0
        link_off = link_len = 0
        if kind == _REG:
            size = entry.size
            if size > self.limits.max_file_size:
                _in_range("size", size, self.limits.max_file_size + 1)
        elif kind == _SYMLINK:
            target = self._link_target(entry, name)
            link_off, link_len = len(self.links), len(target)
            size = link_len
            self.links += target
        elif kind not in (_DIR, _FIFO):
            rdev = os.makedev(entry.dev_major, entry.dev_minor)
        new = self._new_entry(
            kind, mode, uid, gid, size, mtime_ns, rdev, parent, base, link_off, link_len
        )
        paths[key] = new
        if entry.xattrs:
            xattrs = self._xattrs(entry)
            if xattrs:
                self.xattrs[new] = xattrs
        if kind == _REG:
            self._start_file(new, entry, name, size)

    def _link_target(self, entry: TocEntry, name: str) -> bytes:
        target = entry.link_name
        if not target:
            raise LayerFormatError(f"symlink {name!r} has no target")
        try:
            raw = target.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise LayerFormatError(f"symlink {name!r} target is not encodable") from exc
        if b"\x00" in raw:
            raise LayerFormatError(f"symlink {name!r} has an invalid target")
        if len(raw) > min(self.limits.max_path_bytes, MAX_SYMLINK_TARGET_BYTES):
            raise LayerFormatError(
                f"symlink {name!r} target of {len(raw)} bytes is over the kernel's "
                f"{MAX_SYMLINK_TARGET_BYTES}"
            )
        return raw

    def _special(
        self,
        entry: TocEntry,
        kind: int,
        parts: list[bytes],
        uid: int,
        gid: int,
        mtime_ns: int,
    ) -> bool:
        """Handle landmarks and whiteouts; False when the name is an ordinary dot file."""
        base = parts[-1]
        if len(parts) == 1 and base in _LANDMARKS and kind == _REG:
            size = _in_range("size", entry.size, self.limits.max_file_size + 1)
            self._start_file(-1, entry, base.decode(), size)
            if base == PREFETCH_LANDMARK.encode():
                self.prefetch_end = entry.offset
            return True
        if not base.startswith(_WHITEOUT_PREFIX):
            return False
        if kind == _DIR:
            raise LayerFormatError(f"whiteout {base!r} is a directory")
        parent = self._directory(parts[:-1])
        if base == _OPAQUE_MARKER:
            self.opaque.add(parent)
            return True
        if base.startswith(_AUFS_META_PREFIX):
            log.debug("skipping aufs metadata entry name=%r", b"/".join(parts))
            return True
        hidden = base[len(_WHITEOUT_PREFIX) :]
        if not hidden or hidden in (b".", b".."):
            raise LayerFormatError(f"whiteout {base!r} names nothing")
        key = b"/".join([*parts[:-1], hidden])
        if key in self.paths:
            raise LayerFormatError(f"whiteout {base!r} conflicts with an entry")
        new = self._new_entry(
            EntryKind.CHAR.value, stat.S_IFCHR, uid, gid, 0, mtime_ns, 0, parent, hidden, 0, 0
        )
        self.paths[key] = new
        return True

    def _describe_dir(
        self,
        entry: int,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        xattrs: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self._set(ENTRY_MODE, entry, mode)
        self._set(ENTRY_UID, entry, uid)
        self._set(ENTRY_GID, entry, gid)
        self._set(ENTRY_MTIME, entry, mtime_ns)
        self.implicit[entry] = 0
        if xattrs:
            self.xattrs[entry] = xattrs

    def _add_hardlink(self, entry: TocEntry, parts: list[bytes]) -> None:
        if not parts:
            raise LayerFormatError("hardlink at the layer root")
        target_parts = split_name(entry.link_name, self.limits)
        target = self.paths.get(b"/".join(target_parts), -1) if target_parts else -1
        if target < 0:
            raise LayerFormatError(
                f"hardlink {entry.name!r} points to a missing entry {entry.link_name!r}"
            )
        if self.kinds[target] == _DIR:
            raise LayerFormatError(f"hardlink {entry.name!r} points to a directory")
        if parts[-1].startswith(_WHITEOUT_PREFIX):
            raise LayerFormatError(f"hardlink {entry.name!r} is a whiteout")
        parent = self._directory(parts[:-1])
        key = b"/".join(parts)
        if key in self.paths:
            raise LayerFormatError(f"duplicate TOC entry {entry.name!r}")
        self.paths[key] = target
        self.dirent_parent.append(parent)
        self.dirent_target.append(target)
        self.dirent_names.append(parts[-1])
        self._set(ENTRY_NLINK, target, self._get(ENTRY_NLINK, target) + 1)

    # --- file content ----------------------------------------------------------------------

    def _chunk_fields(self, entry: TocEntry, chunk_offset: int) -> _Chunk:
        offset = entry.offset
        chunk_type = entry.chunk_type
        if chunk_type and chunk_type != "zeros":
            raise LayerFormatError(f"unknown chunkType {chunk_type!r}")
        self.payload_offsets.append(offset)
        value = entry.chunk_digest
        digest = sha256_raw(value) if value else None
        if digest is None and value:
            _digest("chunkDigest", value)  # raises with the field in the message
        return (
            chunk_offset, entry.chunk_size, offset, entry.inner_offset, digest,
            chunk_type == "zeros",
        )  # fmt: skip

    def _start_file(self, entry: int, fields: TocEntry, name: str, size: int) -> None:
        if fields.chunk_offset:
            raise LayerFormatError(f"regular file {name!r} has a non-zero chunkOffset")
        chunks: list[_Chunk] = []
        if size > 0:
            chunks.append(self._chunk_fields(fields, 0))
        # The whole-file digest only matters for single-chunk files without a chunkDigest
        # (containers/storage); it is checked when used.
        self.pending = (entry, name, size, fields.digest, fields.end_offset, chunks)

    def _add_chunk(self, entry: TocEntry, name: str) -> None:
        pending = self.pending
        if pending is None or (
            name != pending[1]
            and split_name(name, self.limits) != split_name(pending[1], self.limits)
        ):
            raise LayerFormatError(f"chunk entry {name!r} does not follow its regular file")
        chunks = pending[5]
        if not chunks:
            raise LayerFormatError(f"chunk entry {name!r} belongs to an empty file")
        if len(chunks) >= self.limits.max_chunks_per_file:
            raise LayerFormatError(f"file {name!r} has too many chunks")
        chunks.append(self._chunk_fields(entry, entry.chunk_offset))

    def _finish_file(self) -> None:
        assert self.pending is not None
        entry, name, file_size, file_digest, end_offset, chunks = self.pending
        self.pending = None
        if entry < 0 and not chunks:
            return
        # Runs once per regular file: the limits and the packer are read into locals once.
        max_chunk_size = self.limits.max_chunk_size
        payload_end = self.payload_end
        digests_required = self.chunk_digests_required
        pack = CHUNK.pack
        # Appended in place: a landmark's, validated only, are cut off again below.
        records = self.chunk_records
        digests = self.chunk_digests
        kept_records, kept_digests = len(records), len(digests)
        first_data = -1
        count = len(chunks)
        for i in range(count):
            chunk_offset, size_field, blob_offset, inner, digest, zeros = chunks[i]
            following = chunks[i + 1] if i + 1 < count else None
            size = (file_size if following is None else following[0]) - chunk_offset
            if size <= 0:
                raise LayerFormatError(f"chunks of {name!r} overlap or exceed its size {file_size}")
            if size_field and size_field != size:
                raise LayerFormatError(
                    f"chunk sizes of {name!r} do not add up (chunk at {chunk_offset} says "
                    f"{size_field}, layout says {size})"
                )
            if digest is None and count == 1:
                digest = _digest("digest", file_digest)
            if digest is None and not zeros and digests_required:
                raise LayerFormatError(f"chunk of {name!r} has no digest")
            if zeros:
                blob_end = blob_offset
            else:
                if inner + size > max_chunk_size:
                    raise LayerFormatError(
                        f"chunk of {name!r} at file offset {chunk_offset} decodes to "
                        f"{inner + size} bytes (innerOffset {inner} + size {size}), over the "
                        f"limit of {max_chunk_size}"
                    )
                if blob_offset >= payload_end:
                    raise LayerFormatError(
                        f"chunk of {name!r} at {blob_offset} is outside the payload area "
                        f"[0, {payload_end})"
                    )
                blob_end = -1  # resolved from the next payload offset once all are known
                if end_offset:
                    # containers/storage: a file's chunks are consecutive frames ending at
                    # endOffset.
                    blob_end = end_offset if following is None else following[2]
                    if not blob_offset < blob_end <= payload_end:
                        raise LayerFormatError(
                            f"chunk of {name!r} has an invalid compressed range "
                            f"[{blob_offset}, {blob_end})"
                        )
                if first_data < 0:
                    first_data = blob_offset
            if digest is None:
                records += pack(chunk_offset, size, blob_offset, blob_end, inner,
                                CHUNK_ZEROS if zeros else 0)
                digests += _NO_DIGEST
            else:
                records += pack(chunk_offset, size, blob_offset, blob_end, inner,
                                CHUNK_HAS_DIGEST | CHUNK_ZEROS if zeros else CHUNK_HAS_DIGEST)
                digests += digest
        if entry < 0:  # kept out of the tree (landmark): validated, not stored
            del records[kept_records:], digests[kept_digests:]
            return
        _COUNT_CODEC.pack_into(self.records, entry * ENTRY.size + _COUNT_AT, count)
        if first_data >= 0:
            self.fetch_offsets.append(first_data)
            self.fetch_entries.append(entry)

    # --- finishing -------------------------------------------------------------------------

    def _resolve_blob_ends(self) -> None:
        """eStargz: a chunk's compressed range ends at the next different payload offset.

        Also checks that compressed ranges of different chunks may coincide (packed files)
        but never overlap.
        """
        offsets = sorted(set(self.payload_offsets))
        # Every chunk's offset is among them: the next different one is one lookup away.
        next_offset = dict(itertools.pairwise([*offsets, self.payload_end]))
        del offsets
        records = self.chunk_records
        end_codec, end_at = CHUNK_BLOB_END
        ranges = []
        for c, (_, _, start, recorded_end, _, flags) in enumerate(
            CHUNK.iter_unpack(bytes(records))
        ):
            if flags & CHUNK_ZEROS:
                continue
            end = recorded_end
            if end == -1:
                end = next_offset[start]
                end_codec.pack_into(records, c * CHUNK.size + end_at, end)
            ranges.append((start, end))
        ranges.sort()
        for (p_start, p_end), (start, end) in itertools.pairwise(ranges):
            if (start == p_start and end != p_end) or (start != p_start and start < p_end):
                raise LayerFormatError(
                    f"compressed chunk ranges [{p_start}, {p_end}) and [{start}, {end}) overlap"
                )

    def build(self, toc_digest: str, *, toc_trusted: bool = False) -> CompactLayerIndex:
        if self.pending is not None:
            self._finish_file()
        self._resolve_blob_ends()
        for directory in self.opaque:
            kept = tuple(x for x in self.xattrs.get(directory, ()) if x[0] != OPAQUE_XATTR[0])
            self.xattrs[directory] = (*kept, OPAQUE_XATTR)
        self.paths = {}
        count = len(self.kinds)
        kinds = self.kinds
        parents = self.dirent_parent
        targets = self.dirent_target
        # A directory's dirents sorted by name. No two dirents share (parent, name), so the
        # dirent index riding along in each triple is never compared.
        order = sorted(zip(parents, self.dirent_names, range(len(parents)), strict=True))
        self.dirent_names = []
        old_of_new = [d[2] for d in order]
        sorted_names = [d[1] for d in order]
        per_parent = Counter(d[0] for d in order)  # counted in sorted order, hence keyed so
        del order
        dir_start = array("I", bytes(4 * count))
        dir_count = array("I", bytes(4 * count))
        start = 0
        for parent, children in per_parent.items():
            dir_start[parent] = start
            dir_count[parent] = children
            start += children
        del per_parent
        dirent_target = array("I", map(targets.__getitem__, old_of_new))
        dirent_name_len = array("H", map(len, sorted_names))
        dirent_name_off = array("Q", itertools.accumulate(dirent_name_len, initial=0))
        dirent_name_off.pop()
        names_blob = b"".join(sorted_names)
        del sorted_names
        # The new place of each old dirent, i.e. the inverse of old_of_new.
        position = sorted(range(len(old_of_new)), key=old_of_new.__getitem__)
        del old_of_new
        records = self.records
        # An entry's own name was recorded as its dirent's index at creation: renumber them all.
        name_column = _u32_column(records, ENTRY_NAME_DIRENT, first=1)
        renamed = array("I", map(position.__getitem__, _read_u32(name_column)))
        _write_u32(name_column, renamed)
        del position, renamed, name_column
        subdirs = array("I", bytes(4 * count))
        for parent, target in zip(parents, targets, strict=True):
            if kinds[target] == _DIR:
                subdirs[parent] += 1
        nlink_codec, nlink_at = ENTRY_NLINK
        for entry in [e for e, kind in enumerate(kinds) if kind == _DIR]:
            # "." and its name, plus each subdirectory's ".."
            nlink_codec.pack_into(records, entry * ENTRY.size + nlink_at, 2 + subdirs[entry])
        xattr_entries = array("I", sorted(self.xattrs))
        xattr_offsets = array("Q", [0])
        xattr_data = bytearray()
        for entry in xattr_entries:
            xattr_data += encode_xattrs(self.xattrs[entry])
            xattr_offsets.append(len(xattr_data))
        self.xattrs = {}
        self.mtimes = {}
        files = self._files_in_blob_order()
        arrays = IndexArrays(
            kinds=bytes(kinds),
            records=bytes(records),
            dir_start=dir_start,
            dir_count=dir_count,
            dirent_name_off=dirent_name_off,
            dirent_name_len=dirent_name_len,
            dirent_target=dirent_target,
            names=bytes(names_blob),
            links=bytes(self.links),
            chunk_records=bytes(self.chunk_records),
            chunk_digests=bytes(self.chunk_digests),
            xattr_entries=xattr_entries,
            xattr_offsets=xattr_offsets,
            xattr_data=bytes(xattr_data),
            file_order=files,
        )
        return CompactLayerIndex(
            arrays,
            codec=self.codec,
            toc_digest=toc_digest,
            prefetch_end=self.prefetch_end,
            toc_trusted=toc_trusted,
        )

    def _files_in_blob_order(self) -> array[int]:
        """Regular files with content to fetch, by the blob offset of their first data chunk."""
        offsets = self.fetch_offsets
        if all(offsets[i] <= offsets[i + 1] for i in range(len(offsets) - 1)):
            return self.fetch_entries  # TOC order is blob order for every known writer
        order = sorted(range(len(offsets)), key=offsets.__getitem__)
        return array("I", [self.fetch_entries[i] for i in order])


def build_index(
    entries: Iterable[Any],
    *,
    codec: Codec,
    toc_digest: str,
    payload_end: int,
    limits: IndexLimits,
    toc_trusted: bool = False,
    chunk_digests: bool = True,
) -> CompactLayerIndex:
    """Validate TOC ``entries`` (JSON objects in TOC order) and index them.

    ``payload_end`` bounds every chunk's compressed range (the TOC's offset in the blob).
    ``chunk_digests=False`` accepts chunks without a digest: a zTOC has none per file, only
    per span, and those are checked when a span is inflated.
    """
    builder = _Builder(codec, payload_end, limits, chunk_digests=chunk_digests)
    add = builder.add
    for number, entry in enumerate(entries):
        # Entries decoded by toc_entries are TocEntry already; others (the zTOC reader's, the
        # streaming decoder's) are checked by msgspec here, with the same rules.
        add(entry if type(entry) is TocEntry else entry_from_object(entry, number))
    return builder.build(toc_digest, toc_trusted=toc_trusted)
