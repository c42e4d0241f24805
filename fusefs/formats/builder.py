"""Validate TOC entries and build a CompactLayerIndex from them (pure).

Both TOC schemas are read by one builder: eStargz's JTOC (also used by the legacy zstd:chunked
variant) and containers/storage's ``minimal.FileMetadata``. They share field names; the
differences are handled where they matter:

* eStargz writes ``chunkSize`` 0 on the last chunk and on unchunked files (we compute it);
  containers/storage writes chunk fields only for files with several chunks, and the whole-file
  ``digest`` then is the digest of the single chunk;
* containers/storage gives ``endOffset`` (end of a file's last payload frame); eStargz's
  compressed range of a chunk ends at the next different payload offset (or the TOC).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import logging
import os
import re
import stat
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fusefs.formats.compact import (
    CHUNK_HAS_DIGEST,
    CHUNK_ZEROS,
    DIGEST_SIZE,
    CompactLayerIndex,
    IndexArrays,
    encode_xattrs,
)
from fusefs.formats.errors import LayerFormatError
from fusefs.formats.limits import IndexLimits
from fusefs.formats.modtime import parse_modtime
from fusefs.index import Codec, EntryKind

log = logging.getLogger(__name__)

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_LANDMARKS = frozenset({PREFETCH_LANDMARK.encode(), NO_PREFETCH_LANDMARK.encode()})
_WHITEOUT_PREFIX = b".wh."
_OPAQUE_MARKER = b".wh..wh..opq"
_AUFS_META_PREFIX = b".wh..wh."
OPAQUE_XATTR = (b"trusted.overlay.opaque", b"y")

_KINDS = {
    "dir": EntryKind.DIR,
    "reg": EntryKind.REG,
    "symlink": EntryKind.SYMLINK,
    "char": EntryKind.CHAR,
    "block": EntryKind.BLOCK,
    "fifo": EntryKind.FIFO,
}
_TYPE_BITS = {
    EntryKind.DIR: stat.S_IFDIR,
    EntryKind.REG: stat.S_IFREG,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
}
_U32 = 1 << 32
_I63 = 1 << 63
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}\Z")


def _int(entry: dict[str, Any], key: str, hi: int = _I63, lo: int = 0) -> int:
    value = entry.get(key, 0)
    if type(value) is not int:
        raise LayerFormatError(f"TOC field {key!r} is {value!r}, not an integer")
    if not lo <= value < hi:
        raise LayerFormatError(f"TOC field {key!r} = {value} is out of range")
    return value


def _str(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise LayerFormatError(f"TOC field {key!r} is {value!r}, not a string")
    return value


def _digest(entry: dict[str, Any], key: str) -> bytes | None:
    """The raw 32 bytes of a ``sha256:<hex>`` field, None when absent or empty."""
    value = entry.get(key)
    if not value:
        return None
    if type(value) is not str or not _SHA256.match(value):
        raise LayerFormatError(f"TOC field {key!r} = {value!r} is not a sha256 digest")
    return bytes.fromhex(value[7:])


def split_name(name: str, limits: IndexLimits) -> list[bytes]:
    """A TOC name as path components; ``./``, leading ``/`` and trailing ``/`` are dropped."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise LayerFormatError(f"TOC name {name!r} is not encodable") from exc
    if b"\x00" in raw:
        raise LayerFormatError(f"TOC name {name!r} contains NUL")
    if len(raw) > limits.max_path_bytes:
        raise LayerFormatError(f"TOC name of {len(raw)} bytes is too long")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise LayerFormatError(f"TOC name {name!r} contains '..'")
    if len(parts) > limits.max_depth:
        raise LayerFormatError(f"TOC name {name!r} is nested too deeply")
    for part in parts:
        if len(part) > limits.max_name_bytes:
            raise LayerFormatError(f"TOC name component of {len(part)} bytes is too long")
    return parts


@dataclass(slots=True)
class _PendingChunk:
    chunk_offset: int
    size_field: int
    blob_offset: int
    inner_offset: int
    digest: bytes | None
    zeros: bool


@dataclass(slots=True)
class _PendingFile:
    entry: int  # -1: a file kept out of the tree (landmark)
    name: str
    size: int
    digest: bytes | None
    end_offset: int  # 0: not given
    chunks: list[_PendingChunk] = field(default_factory=list)


class _Builder:
    def __init__(self, codec: Codec, payload_end: int, limits: IndexLimits) -> None:
        self.codec = codec
        self.payload_end = payload_end
        self.limits = limits
        self.kind = array("B")
        self.mode = array("I")
        self.uid = array("I")
        self.gid = array("I")
        self.size = array("q")
        self.mtime_ns = array("q")
        self.rdev = array("Q")
        self.nlink = array("I")
        self.parent = array("I")
        self.name_dirent = array("I")
        self.link_off = array("Q")
        self.link_len = array("I")
        self.chunk_start = array("I")
        self.chunk_count = array("I")
        self.implicit = bytearray()  # 1: a directory nobody has described yet
        self.links = bytearray()
        self.xattrs: dict[int, tuple[tuple[bytes, bytes], ...]] = {}
        self.opaque: set[int] = set()
        self.paths: dict[bytes, int] = {}
        self.dirents: list[tuple[int, bytes, int]] = []
        self.c_file_offset = array("q")
        self.c_size = array("q")
        self.c_blob_offset = array("q")
        self.c_blob_end = array("q")  # -1 until resolved from the next payload offset
        self.c_inner = array("q")
        self.c_flags = array("B")
        self.c_digests = bytearray()
        self.payload_offsets = array("q")
        self.pending: _PendingFile | None = None
        self.prefetch_end: int | None = None
        self.root_described = False
        self.mtimes: dict[str, int] = {}  # layers repeat a few timestamps: parse each once
        self._new_entry(EntryKind.DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, -1, b"")
        self.implicit[0] = 1

    # --- entries ---------------------------------------------------------------------------

    def _modtime(self, value: object) -> int:
        if type(value) is not str:
            return parse_modtime(value)
        parsed = self.mtimes.get(value)
        if parsed is None:
            parsed = parse_modtime(value)
            if len(self.mtimes) < 65536:
                self.mtimes[value] = parsed
        return parsed

    def _new_entry(
        self,
        kind: EntryKind,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime_ns: int,
        rdev: int,
        parent: int,
        name: bytes,
    ) -> int:
        entry = len(self.kind)
        if entry >= self.limits.max_entries:
            raise LayerFormatError(
                f"layer has more than {self.limits.max_entries} entries (incl. implied dirs)"
            )
        self.kind.append(kind)
        self.mode.append(mode)
        self.uid.append(uid)
        self.gid.append(gid)
        self.size.append(size)
        self.mtime_ns.append(mtime_ns)
        self.rdev.append(rdev)
        self.nlink.append(1)
        self.parent.append(max(parent, 0))
        self.link_off.append(0)
        self.link_len.append(0)
        self.chunk_start.append(0)
        self.chunk_count.append(0)
        self.implicit.append(0)
        if parent >= 0:
            self.name_dirent.append(len(self.dirents))
            self.dirents.append((parent, name, entry))
        else:
            self.name_dirent.append(0)
        return entry

    def _directory(self, parts: list[bytes]) -> int:
        """The id of the directory ``parts``, creating implied directories as needed."""
        found = self.paths.get(b"/".join(parts), -1) if parts else 0
        if found >= 0:
            if self.kind[found] != EntryKind.DIR:
                raise LayerFormatError(f"{b'/'.join(parts)!r} is used as a directory")
            return found
        current = 0
        for depth in range(1, len(parts) + 1):
            key = b"/".join(parts[:depth])
            child = self.paths.get(key, -1)
            if child < 0:
                child = self._new_entry(
                    EntryKind.DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, current, parts[depth - 1]
                )
                self.implicit[child] = 1
                self.paths[key] = child
            elif self.kind[child] != EntryKind.DIR:
                raise LayerFormatError(f"{key!r} is used as a directory")
            current = child
        return current

    def _xattrs(self, entry: dict[str, Any]) -> tuple[tuple[bytes, bytes], ...]:
        raw = entry.get("xattrs")
        if raw is None:
            return ()
        if not isinstance(raw, dict):
            raise LayerFormatError("TOC field 'xattrs' is not an object")
        if len(raw) > self.limits.max_xattrs_per_entry:
            raise LayerFormatError(f"entry has {len(raw)} xattrs, over the limit")
        pairs = []
        for key, value in raw.items():
            if not isinstance(value, str):
                raise LayerFormatError(f"xattr {key!r} value is not a base64 string")
            try:
                name = key.encode("utf-8", "surrogateescape")
                data = base64.b64decode(value, validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
                raise LayerFormatError(f"xattr {key!r} is not valid base64: {exc}") from exc
            if not name or b"\x00" in name or len(name) > self.limits.max_name_bytes:
                raise LayerFormatError(f"xattr name {key!r} is invalid")
            if len(data) > self.limits.max_xattr_value_bytes:
                raise LayerFormatError(f"xattr {key!r} value of {len(data)} bytes is too large")
            pairs.append((name, data))
        return tuple(pairs)

    def add(self, entry: Any) -> None:
        if not isinstance(entry, dict):
            raise LayerFormatError("TOC entry is not an object")
        typ = entry.get("type")
        name = entry.get("name")
        if not isinstance(typ, str) or not isinstance(name, str):
            raise LayerFormatError("TOC entry lacks a string 'type' or 'name'")
        if typ == "chunk":
            self._add_chunk(entry, name)
            return
        self._finish_file()
        parts = split_name(name, self.limits)
        if typ == "hardlink":
            self._add_hardlink(entry, parts)
            return
        kind = _KINDS.get(typ)
        if kind is None:
            raise LayerFormatError(f"unknown TOC entry type {typ!r}")
        mode = _TYPE_BITS[kind] | (_int(entry, "mode", _U32) & 0o7777)
        uid = _int(entry, "uid", _U32)
        gid = _int(entry, "gid", _U32)
        mtime_ns = self._modtime(entry.get("modtime"))
        if not parts:
            if kind != EntryKind.DIR or self.root_described:
                raise LayerFormatError("duplicate or non-directory root entry")
            self._describe_dir(0, mode, uid, gid, mtime_ns, self._xattrs(entry))
            self.root_described = True
            return
        base = parts[-1]
        if len(parts) == 1 and base in _LANDMARKS and kind == EntryKind.REG:
            self._add_landmark(entry, base)
            return
        if base.startswith(_WHITEOUT_PREFIX):
            self._add_whiteout(kind, parts, uid, gid, mtime_ns)
            return
        key = b"/".join(parts)
        if len(parts) == 1:
            parent = 0
        else:
            parent = self.paths.get(key[: -len(base) - 1], -1)
            if parent < 0 or self.kind[parent] != EntryKind.DIR:
                parent = self._directory(parts[:-1])
        existing = self.paths.get(key, -1)
        if existing >= 0:
            if kind == EntryKind.DIR and self.implicit[existing]:
                self._describe_dir(existing, mode, uid, gid, mtime_ns, self._xattrs(entry))
                return
            raise LayerFormatError(f"duplicate TOC entry {name!r}")
        size = 0
        rdev = 0
        if kind in (EntryKind.CHAR, EntryKind.BLOCK):
            rdev = os.makedev(_int(entry, "devMajor", 1 << 31), _int(entry, "devMinor", 1 << 31))
        elif kind == EntryKind.REG:
            size = _int(entry, "size", self.limits.max_file_size + 1)
        new = self._new_entry(kind, mode, uid, gid, size, mtime_ns, rdev, parent, base)
        self.paths[key] = new
        if "xattrs" in entry:
            xattrs = self._xattrs(entry)
            if xattrs:
                self.xattrs[new] = xattrs
        if kind == EntryKind.DIR:
            return
        if kind == EntryKind.SYMLINK:
            target = _str(entry, "linkName")
            if not target:
                raise LayerFormatError(f"symlink {name!r} has no target")
            try:
                raw = target.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError as exc:
                raise LayerFormatError(f"symlink {name!r} target is not encodable") from exc
            if b"\x00" in raw or len(raw) > self.limits.max_path_bytes:
                raise LayerFormatError(f"symlink {name!r} has an invalid target")
            self.link_off[new] = len(self.links)
            self.link_len[new] = len(raw)
            self.size[new] = len(raw)
            self.links += raw
        elif kind == EntryKind.REG:
            self._start_file(new, entry, name, size)

    def _describe_dir(
        self,
        entry: int,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        xattrs: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self.mode[entry] = mode
        self.uid[entry] = uid
        self.gid[entry] = gid
        self.mtime_ns[entry] = mtime_ns
        self.implicit[entry] = 0
        if xattrs:
            self.xattrs[entry] = xattrs

    def _add_landmark(self, entry: dict[str, Any], base: bytes) -> None:
        size = _int(entry, "size", self.limits.max_file_size + 1)
        self._start_file(-1, entry, base.decode(), size)
        if base == PREFETCH_LANDMARK.encode():
            self.prefetch_end = _int(entry, "offset")

    def _add_whiteout(
        self, kind: EntryKind, parts: list[bytes], uid: int, gid: int, mtime_ns: int
    ) -> None:
        base = parts[-1]
        if kind == EntryKind.DIR:
            raise LayerFormatError(f"whiteout {base!r} is a directory")
        parent = self._directory(parts[:-1])
        if base == _OPAQUE_MARKER:
            self.opaque.add(parent)
            return
        if base.startswith(_AUFS_META_PREFIX):
            log.debug("skipping aufs metadata entry name=%r", b"/".join(parts))
            return
        hidden = base[len(_WHITEOUT_PREFIX) :]
        if not hidden or hidden in (b".", b".."):
            raise LayerFormatError(f"whiteout {base!r} names nothing")
        key = b"/".join([*parts[:-1], hidden])
        if key in self.paths:
            raise LayerFormatError(f"whiteout {base!r} conflicts with an entry")
        new = self._new_entry(
            EntryKind.CHAR, stat.S_IFCHR, uid, gid, 0, mtime_ns, 0, parent, hidden
        )
        self.paths[key] = new

    def _add_hardlink(self, entry: dict[str, Any], parts: list[bytes]) -> None:
        if not parts:
            raise LayerFormatError("hardlink at the layer root")
        target_parts = split_name(_str(entry, "linkName"), self.limits)
        target = self.paths.get(b"/".join(target_parts), -1) if target_parts else -1
        if target < 0:
            raise LayerFormatError(
                f"hardlink {entry['name']!r} points to a missing entry {entry.get('linkName')!r}"
            )
        if self.kind[target] == EntryKind.DIR:
            raise LayerFormatError(f"hardlink {entry['name']!r} points to a directory")
        if parts[-1].startswith(_WHITEOUT_PREFIX):
            raise LayerFormatError(f"hardlink {entry['name']!r} is a whiteout")
        parent = self._directory(parts[:-1])
        key = b"/".join(parts)
        if key in self.paths:
            raise LayerFormatError(f"duplicate TOC entry {entry['name']!r}")
        self.paths[key] = target
        self.dirents.append((parent, parts[-1], target))
        self.nlink[target] += 1

    # --- file content ----------------------------------------------------------------------

    def _chunk_fields(self, entry: dict[str, Any], chunk_offset: int) -> _PendingChunk:
        chunk_type = _str(entry, "chunkType")
        if chunk_type not in ("", "zeros"):
            raise LayerFormatError(f"unknown chunkType {chunk_type!r}")
        offset = _int(entry, "offset")
        self.payload_offsets.append(offset)
        return _PendingChunk(
            chunk_offset=chunk_offset,
            size_field=_int(entry, "chunkSize"),
            blob_offset=offset,
            inner_offset=_int(entry, "innerOffset"),
            digest=_digest(entry, "chunkDigest"),
            zeros=chunk_type == "zeros",
        )

    def _start_file(self, entry: int, fields: dict[str, Any], name: str, size: int) -> None:
        if _int(fields, "chunkOffset") != 0:
            raise LayerFormatError(f"regular file {name!r} has a non-zero chunkOffset")
        pending = _PendingFile(
            entry=entry,
            name=name,
            size=size,
            digest=_digest(fields, "digest"),
            end_offset=_int(fields, "endOffset"),
        )
        if size > 0:
            pending.chunks.append(self._chunk_fields(fields, 0))
        self.pending = pending

    def _add_chunk(self, entry: dict[str, Any], name: str) -> None:
        pending = self.pending
        if pending is None or split_name(name, self.limits) != split_name(
            pending.name, self.limits
        ):
            raise LayerFormatError(f"chunk entry {name!r} does not follow its regular file")
        if not pending.chunks:
            raise LayerFormatError(f"chunk entry {name!r} belongs to an empty file")
        if len(pending.chunks) >= self.limits.max_chunks_per_file:
            raise LayerFormatError(f"file {name!r} has too many chunks")
        pending.chunks.append(self._chunk_fields(entry, _int(entry, "chunkOffset")))

    def _finish_file(self) -> None:
        pending = self.pending
        if pending is None:
            return
        self.pending = None
        chunks = pending.chunks
        first = len(self.c_size)
        for i, chunk in enumerate(chunks):
            end_in_file = chunks[i + 1].chunk_offset if i + 1 < len(chunks) else pending.size
            size = end_in_file - chunk.chunk_offset
            if size <= 0:
                raise LayerFormatError(
                    f"chunks of {pending.name!r} overlap or exceed its size {pending.size}"
                )
            if chunk.size_field and chunk.size_field != size:
                raise LayerFormatError(
                    f"chunk sizes of {pending.name!r} do not add up (chunk at "
                    f"{chunk.chunk_offset} says {chunk.size_field}, layout says {size})"
                )
            digest = chunk.digest
            if digest is None and len(chunks) == 1:
                digest = pending.digest
            if digest is None and not chunk.zeros:
                raise LayerFormatError(f"chunk of {pending.name!r} has no digest")
            blob_offset = chunk.blob_offset
            if chunk.zeros:
                blob_end = blob_offset
            else:
                if blob_offset >= self.payload_end:
                    raise LayerFormatError(
                        f"chunk of {pending.name!r} at {blob_offset} is outside the payload "
                        f"area [0, {self.payload_end})"
                    )
                blob_end = -1
                if pending.end_offset:
                    # containers/storage: a file's chunks are consecutive frames ending at
                    # endOffset.
                    following = [c.blob_offset for c in chunks[i + 1 :] if c.blob_offset]
                    blob_end = following[0] if following else pending.end_offset
                    if not blob_offset < blob_end <= self.payload_end:
                        raise LayerFormatError(
                            f"chunk of {pending.name!r} has an invalid compressed range "
                            f"[{blob_offset}, {blob_end})"
                        )
            self.c_file_offset.append(chunk.chunk_offset)
            self.c_size.append(size)
            self.c_blob_offset.append(blob_offset)
            self.c_blob_end.append(blob_end)
            self.c_inner.append(chunk.inner_offset)
            flags = (CHUNK_HAS_DIGEST if digest is not None else 0) | (
                CHUNK_ZEROS if chunk.zeros else 0
            )
            self.c_flags.append(flags)
            self.c_digests += digest if digest is not None else bytes(DIGEST_SIZE)
        if pending.entry < 0:  # kept out of the tree: forget its chunks
            del self.c_file_offset[first:]
            del self.c_size[first:]
            del self.c_blob_offset[first:]
            del self.c_blob_end[first:]
            del self.c_inner[first:]
            del self.c_flags[first:]
            del self.c_digests[first * DIGEST_SIZE :]
            return
        self.chunk_start[pending.entry] = first
        self.chunk_count[pending.entry] = len(chunks)

    # --- finishing -------------------------------------------------------------------------

    def _resolve_blob_ends(self) -> None:
        """eStargz: a chunk's compressed range ends at the next different payload offset."""
        offsets = sorted(set(self.payload_offsets))
        offsets.append(self.payload_end)
        for c in range(len(self.c_blob_end)):
            if self.c_blob_end[c] == -1:
                start = self.c_blob_offset[c]
                self.c_blob_end[c] = offsets[bisect.bisect_right(offsets, start)]

    def _check_blob_ranges(self) -> None:
        """Compressed ranges of different chunks may coincide (packed) but never overlap."""
        data = [c for c in range(len(self.c_flags)) if not self.c_flags[c] & CHUNK_ZEROS]
        data.sort(key=self.c_blob_offset.__getitem__)
        previous = -1
        for c in data:
            if previous >= 0:
                p_start, p_end = self.c_blob_offset[previous], self.c_blob_end[previous]
                start, end = self.c_blob_offset[c], self.c_blob_end[c]
                if (start == p_start and end != p_end) or (start != p_start and start < p_end):
                    raise LayerFormatError(
                        f"compressed chunk ranges [{p_start}, {p_end}) and [{start}, {end}) overlap"
                    )
            previous = c

    def build(self, toc_digest: str) -> CompactLayerIndex:
        self._finish_file()
        self._resolve_blob_ends()
        self._check_blob_ranges()
        for directory in self.opaque:
            kept = tuple(x for x in self.xattrs.get(directory, ()) if x[0] != OPAQUE_XATTR[0])
            self.xattrs[directory] = (*kept, OPAQUE_XATTR)
        count = len(self.kind)
        dir_start = array("I", bytes(4 * count))
        dir_count = array("I", bytes(4 * count))
        order = sorted(range(len(self.dirents)), key=lambda d: self.dirents[d][:2])
        position = array("I", bytes(4 * len(order)))
        dirent_name_off = array("Q")
        dirent_name_len = array("H")
        dirent_target = array("I")
        names = bytearray()
        for new, old in enumerate(order):
            parent, name, target = self.dirents[old]
            position[old] = new
            if dir_count[parent] == 0:
                dir_start[parent] = new
            dir_count[parent] += 1
            dirent_name_off.append(len(names))
            dirent_name_len.append(len(name))
            dirent_target.append(target)
            names += name
            if self.kind[target] == EntryKind.DIR:
                self.nlink[parent] += 1
        for entry in range(count):
            if self.kind[entry] == EntryKind.DIR:
                self.nlink[entry] += 1  # "." and the name in the parent: 2 + subdirectories
            if entry:
                self.name_dirent[entry] = position[self.name_dirent[entry]]
        self.dirents = []
        self.paths = {}
        xattr_entries = array("I", sorted(self.xattrs))
        xattr_offsets = array("Q", [0])
        xattr_data = bytearray()
        for entry in xattr_entries:
            xattr_data += encode_xattrs(self.xattrs[entry])
            xattr_offsets.append(len(xattr_data))
        self.xattrs = {}
        self.mtimes = {}
        files = [e for e in range(count) if self.chunk_count[e] and self._first_data(e) >= 0]
        files.sort(key=self._first_data)
        arrays = IndexArrays(
            kind=self.kind,
            mode=self.mode,
            uid=self.uid,
            gid=self.gid,
            size=self.size,
            mtime_ns=self.mtime_ns,
            rdev=self.rdev,
            nlink=self.nlink,
            parent=self.parent,
            name_dirent=self.name_dirent,
            dir_start=dir_start,
            dir_count=dir_count,
            link_off=self.link_off,
            link_len=self.link_len,
            chunk_start=self.chunk_start,
            chunk_count=self.chunk_count,
            dirent_name_off=dirent_name_off,
            dirent_name_len=dirent_name_len,
            dirent_target=dirent_target,
            names=bytes(names),
            links=bytes(self.links),
            chunk_file_offset=self.c_file_offset,
            chunk_size=self.c_size,
            chunk_blob_offset=self.c_blob_offset,
            chunk_blob_end=self.c_blob_end,
            chunk_inner_offset=self.c_inner,
            chunk_flags=self.c_flags,
            chunk_digests=bytes(self.c_digests),
            xattr_entries=xattr_entries,
            xattr_offsets=xattr_offsets,
            xattr_data=bytes(xattr_data),
            file_order=array("I", files),
        )
        return CompactLayerIndex(
            arrays, codec=self.codec, toc_digest=toc_digest, prefetch_end=self.prefetch_end
        )

    def _first_data(self, entry: int) -> int:
        start = self.chunk_start[entry]
        for c in range(start, start + self.chunk_count[entry]):
            if not self.c_flags[c] & CHUNK_ZEROS:
                return self.c_blob_offset[c]
        return -1


def build_index(
    entries: Iterable[Any],
    *,
    codec: Codec,
    toc_digest: str,
    payload_end: int,
    limits: IndexLimits,
) -> CompactLayerIndex:
    """Validate TOC ``entries`` (JSON objects in TOC order) and index them.

    ``payload_end`` bounds every chunk's compressed range (the TOC's offset in the blob).
    """
    builder = _Builder(codec, payload_end, limits)
    for entry in entries:
        builder.add(entry)
    return builder.build(toc_digest)
