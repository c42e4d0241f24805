"""Writers: a plain or compressed layer tar in, an eStargz or zstd:chunked blob out.

The output decompresses to a tar whose members carry the input's header bytes unchanged.
Only their order changes, with prioritized files first. For eStargz, the landmark file and the
TOC member are added, as the eStargz format defines. Compression restarts with a new gzip member
or zstd frame at every payload chunk, so each chunk can be fetched and decoded on its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO, Protocol

import zstandard

from fusefs.formats import annotations as keys
from fusefs.formats.builder import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK
from fusefs.formats.crc64 import Crc64
from fusefs.formats.footer import (
    SKIPPABLE_HEADER_SIZE,
    LayerFormat,
    build_estargz_footer,
    build_zstd_footer,
    build_zstd_legacy_footer,
    skippable_frame,
)
from fusefs.formats.modtime import format_modtime
from fusefs.formats.result import WriteResult
from fusefs.formats.tarscan import (
    BLOCK,
    TarMember,
    iter_range,
    prioritize,
    read_range,
    scan_members,
    seekable_tar,
)
from fusefs.formats.tocdata import TOC_TAR_NAME

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
LANDMARK_CONTENT = b"\x0f"
_IO_PIECE = 1 << 20
_ZEROS_THRESHOLD = 1024  # containers/storage: zero runs this long become "zeros" chunks
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_TYPE_NAMES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


class _Sink:
    """The output stream, counting and hashing what is written."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.sha.update(data)
            self.count += len(data)


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Framed:
    """A stream of independently decodable gzip members or zstd frames."""

    def __init__(self, sink: _Sink, codec: str, level: int) -> None:
        self.sink = sink
        self.codec = codec
        self.level = level
        self.zstd = zstandard.ZstdCompressor(level=level) if codec == "zstd" else None
        self.current: _Compressor | None = None
        self.frame_start = 0
        self.frame_raw = 0  # uncompressed bytes in the current frame
        self.raw_total = 0
        self.raw_sha = hashlib.sha256()

    def new_frame(self) -> None:
        self.end_frame()
        if self.zstd is not None:
            self.current = self.zstd.compressobj()
        else:
            self.current = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.frame_start = self.sink.count
        self.frame_raw = 0

    def end_frame(self) -> None:
        if self.current is not None:
            self.sink.write(self.current.flush())
            self.current = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.current is None:
            self.new_frame()
        assert self.current is not None
        self.sink.write(self.current.compress(data))
        self.frame_raw += len(data)
        self.raw_total += len(data)
        self.raw_sha.update(data)


def _xattrs(info: tarfile.TarInfo) -> dict[str, str]:
    found = {}
    for key, value in info.pax_headers.items():
        if key.startswith(_XATTR_PAX_PREFIX):
            raw = value.encode("utf-8", "surrogateescape")
            found[key[len(_XATTR_PAX_PREFIX) :]] = base64.b64encode(raw).decode()
    return found


def _base_entry(info: tarfile.TarInfo) -> dict[str, Any]:
    typ = _TYPE_NAMES.get(info.type)
    if typ is None:
        raise ValueError(f"tar member {info.name!r} has unsupported type {info.type!r}")
    name = info.name + "/" if typ == "dir" else info.name
    entry: dict[str, Any] = {"name": name, "type": typ}
    mtime = info.mtime
    entry["modtime"] = format_modtime(
        mtime * 1_000_000_000 if isinstance(mtime, int) else round(mtime * 1e9)
    )
    entry["mode"] = info.mode & 0o7777
    if info.uid:
        entry["uid"] = info.uid
    if info.gid:
        entry["gid"] = info.gid
    if info.uname:
        entry["userName"] = info.uname
    if info.gname:
        entry["groupName"] = info.gname
    if typ in ("symlink", "hardlink"):
        entry["linkName"] = info.linkname
    if typ in ("char", "block"):
        entry["devMajor"] = info.devmajor
        entry["devMinor"] = info.devminor
    if typ == "reg":
        entry["size"] = info.size
    xattrs = _xattrs(info)
    if xattrs:
        entry["xattrs"] = xattrs
    return entry


class _TarSplit:
    """tar-split's JSON-lines description of the output tar. containers/storage uses it to
    rebuild the exact tar from a partially pulled layer."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.pending_raw = bytearray()

    def raw(self, data: bytes) -> None:
        self.pending_raw += data

    def _flush_segment(self) -> None:
        if self.pending_raw:
            self._line({"type": 2, "payload": base64.b64encode(self.pending_raw).decode()})
            self.pending_raw = bytearray()

    def file(self, name: str, size: int, crc: bytes | None) -> None:
        self._flush_segment()
        line: dict[str, Any] = {"type": 1, "size": size} if size else {"type": 1}
        try:
            name.encode("utf-8")
            line["name"] = name
        except UnicodeEncodeError:
            line["name_raw"] = base64.b64encode(name.encode("utf-8", "surrogateescape")).decode()
        line["payload"] = base64.b64encode(crc).decode() if crc is not None else None
        self._line(line)

    def _line(self, fields: dict[str, Any]) -> None:
        fields["position"] = len(self.lines)
        self.lines.append(json.dumps(fields, separators=(",", ":")).encode())

    def finish(self) -> bytes:
        self._flush_segment()
        return b"".join(line + b"\n" for line in self.lines)


class _LayerWriter:
    def __init__(
        self,
        source: BinaryIO,
        sink: _Sink,
        *,
        fmt: LayerFormat,
        chunk_size: int,
        level: int,
        min_chunk_size: int,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.source = source
        self.fmt = fmt
        self.native = fmt is LayerFormat.ZSTD_CHUNKED  # containers/storage schema and framing
        self.framed = _Framed(sink, "gzip" if fmt is LayerFormat.ESTARGZ else "zstd", level)
        self.chunk_size = chunk_size
        self.min_chunk_size = min_chunk_size
        self.entries: list[dict[str, Any]] = []
        self.tarsplit = _TarSplit() if self.native else None

    def raw(self, data: bytes) -> None:
        """Tar bytes that are not file content: headers, padding, end-of-archive."""
        self.framed.write(data)
        if self.tarsplit is not None:
            self.tarsplit.raw(data)

    def member(self, member: TarMember) -> None:
        info = member.info
        self.raw(
            read_range(self.source, member.header_start, member.data_start - member.header_start)
        )
        entry = _base_entry(info)
        size = member.data_size
        crc = Crc64() if self.tarsplit is not None and size else None
        pieces = self._payload(entry, member.data_start, size, crc)
        if self.tarsplit is not None:
            self.tarsplit.file(info.name, info.size, crc.digest() if crc else None)
        self.entries.extend(pieces)
        padding = member.end - (member.data_start + size)
        if padding:
            self.raw(read_range(self.source, member.data_start + size, padding))

    def synthetic(self, info: tarfile.TarInfo, content: bytes) -> None:
        """A member that is not in the input, such as the landmark."""
        self.raw(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        entry = _base_entry(info)
        crc = Crc64() if self.tarsplit is not None else None
        self.entries.extend(self._payload(entry, -1, len(content), crc, content))
        if self.tarsplit is not None and crc is not None:
            self.tarsplit.file(info.name, len(content), crc.digest())
        self.raw(bytes(-len(content) % BLOCK))

    def _payload(
        self,
        entry: dict[str, Any],
        start: int,
        size: int,
        crc: Crc64 | None,
        content: bytes | None = None,
    ) -> list[dict[str, Any]]:
        if size == 0:
            return [entry]
        file_sha = hashlib.sha256()
        chunks: list[dict[str, Any]] = []
        for chunk_offset in range(0, size, self.chunk_size):
            length = min(self.chunk_size, size - chunk_offset)
            framed = self.framed
            if not (
                self.min_chunk_size and framed.current and framed.frame_raw < self.min_chunk_size
            ):
                framed.new_frame()
            record: dict[str, Any] = {"offset": framed.frame_start}
            if framed.frame_raw:
                record["innerOffset"] = framed.frame_raw
            chunk_sha = hashlib.sha256()
            all_zero = True
            pieces: Iterable[bytes]
            if content is not None:
                pieces = [content[chunk_offset : chunk_offset + length]]
            else:
                pieces = iter_range(self.source, start + chunk_offset, length, _IO_PIECE)
            for piece in pieces:
                framed.write(piece)
                chunk_sha.update(piece)
                file_sha.update(piece)
                if crc is not None:
                    crc.update(piece)
                if all_zero and piece.count(0) != len(piece):
                    all_zero = False
            record["chunkOffset"] = chunk_offset
            record["chunkSize"] = length
            record["chunkDigest"] = "sha256:" + chunk_sha.hexdigest()
            if self.native and all_zero and length >= _ZEROS_THRESHOLD:
                record["chunkType"] = "zeros"
            chunks.append(record)
        if self.native:
            # Payload frames hold payload only, so endOffset is exact; the padding and the
            # next header start a new frame.
            self.framed.end_frame()
        entry["digest"] = "sha256:" + file_sha.hexdigest()
        return self._chunk_entries(entry, chunks, size)

    def _chunk_entries(
        self, entry: dict[str, Any], chunks: list[dict[str, Any]], size: int
    ) -> list[dict[str, Any]]:
        out = [entry]
        if self.native:
            # containers/storage: chunk fields only when there are several chunks; endOffset
            # is where the file's last payload frame ends.
            entry["offset"] = chunks[0]["offset"]
            entry["endOffset"] = self.framed.sink.count
            if len(chunks) == 1:
                return out
            for i, chunk in enumerate(chunks):
                target = entry if i == 0 else {"type": "chunk", "name": entry["name"]}
                target.update(chunk)
                if i == 0:
                    target.pop("chunkOffset")
                else:
                    out.append(target)
            return out
        # eStargz: chunkSize is 0 on the last chunk and on unchunked files.
        for i, chunk in enumerate(chunks):
            if i == len(chunks) - 1:
                chunk["chunkSize"] = 0
            if i == 0:
                chunk.pop("chunkOffset")
                entry.update(chunk)
            else:
                out.append({"type": "chunk", "name": entry["name"], **chunk})
        return out


def _landmark(prioritized: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK)
    info.size = len(LANDMARK_CONTENT)
    info.mode = 0o644
    info.mtime = 0
    return info


def _write_members(writer: _LayerWriter, prioritized: Sequence[str], landmark: bool) -> int:
    """Write prioritized members, the landmark, the rest; return where the input's tail starts."""
    members, tail_start = scan_members(writer.source)
    first, rest = prioritize(members, prioritized)
    for member in first:
        writer.member(member)
    if landmark or first:
        writer.synthetic(_landmark(bool(first)), LANDMARK_CONTENT)
    for member in rest:
        writer.member(member)
    return tail_start


def _toc_json(entries: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
    document: dict[str, Any] = {"version": 1, "entries": entries}
    if extra:
        document.update(extra)
    # Names that are not UTF-8 arrive as lone surrogates (surrogateescape); "backslashreplace"
    # writes them as JSON \udcXX escapes, which our reader maps back to the original bytes
    # and Go readers to U+FFFD, instead of invalid UTF-8 that no JSON reader accepts.
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "backslashreplace"
    )


def write_estargz(
    tar_in: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
    compression_level: int = 9,
    min_chunk_size: int = 0,
) -> WriteResult:
    """Convert a plain, gzip or zstd layer tar to eStargz.

    ``prioritized`` paths and their parent directories come first, followed by
    ``.prefetch.landmark``; without any, ``.no.prefetch.landmark`` comes first. Names not in
    the layer are ignored. ``min_chunk_size`` > 0 packs payloads into the current gzip member
    while it holds fewer uncompressed bytes; the entries in it then differ by ``innerOffset``.
    """
    with seekable_tar(tar_in) as source:
        return _write_estargz(
            source, out, chunk_size, prioritized, compression_level, min_chunk_size
        )


def _write_estargz(
    source: BinaryIO,
    out: BinaryIO,
    chunk_size: int,
    prioritized: Sequence[str],
    compression_level: int,
    min_chunk_size: int,
) -> WriteResult:
    sink = _Sink(out)
    writer = _LayerWriter(
        source,
        sink,
        fmt=LayerFormat.ESTARGZ,
        chunk_size=chunk_size,
        level=compression_level,
        min_chunk_size=min_chunk_size,
    )
    _write_members(writer, prioritized, landmark=True)
    toc = _toc_json(writer.entries)
    toc_header = tarfile.TarInfo(TOC_TAR_NAME)
    toc_header.size = len(toc)
    toc_header.mode = 0o644
    framed = writer.framed
    framed.new_frame()
    toc_offset = framed.frame_start
    framed.write(toc_header.tobuf(tarfile.USTAR_FORMAT))
    framed.write(toc + bytes(-len(toc) % BLOCK) + bytes(2 * BLOCK))
    framed.end_frame()
    toc_length = sink.count - toc_offset
    sink.write(build_estargz_footer(toc_offset))
    toc_digest = "sha256:" + hashlib.sha256(toc).hexdigest()
    result = WriteResult(
        format=LayerFormat.ESTARGZ,
        digest="sha256:" + sink.sha.hexdigest(),
        size=sink.count,
        diff_id="sha256:" + framed.raw_sha.hexdigest(),
        uncompressed_size=framed.raw_total,
        toc_digest=toc_digest,
        toc_offset=toc_offset,
        toc_length=toc_length,
        entry_count=len(writer.entries),
        annotations={
            keys.ESTARGZ_TOC_DIGEST: toc_digest,
            keys.ESTARGZ_UNCOMPRESSED_SIZE: str(framed.raw_total),
        },
    )
    log.info(
        "estargz written digest=%s size=%d entries=%d",
        result.digest,
        result.size,
        result.entry_count,
    )
    return result


def write_zstd_chunked(
    tar_in: BinaryIO,
    out: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
    compression_level: int = 10,
    legacy: bool = False,
) -> WriteResult:
    """Convert a plain, gzip or zstd layer tar to zstd:chunked.

    The default is the current containers/storage format: a 64-byte footer, tar-split, and its
    TOC schema with ``endOffset`` and ``zeros`` chunks. ``legacy=True`` writes
    stargz-snapshotter's variant: a 40-byte footer, the eStargz TOC schema and no tar-split.
    Chunks have a fixed size rather than containers/storage's content-defined boundaries, which
    readers do not care about. Without ``prioritized`` files the output decompresses to exactly
    the input tar and no landmark is added; with them, the files come first followed by
    ``.prefetch.landmark``.
    """
    with seekable_tar(tar_in) as source:
        return _write_zstd_chunked(source, out, chunk_size, prioritized, compression_level, legacy)


def _write_zstd_chunked(
    source: BinaryIO,
    out: BinaryIO,
    chunk_size: int,
    prioritized: Sequence[str],
    compression_level: int,
    legacy: bool,
) -> WriteResult:
    sink = _Sink(out)
    fmt = LayerFormat.ZSTD_CHUNKED_LEGACY if legacy else LayerFormat.ZSTD_CHUNKED
    writer = _LayerWriter(
        source, sink, fmt=fmt, chunk_size=chunk_size, level=compression_level, min_chunk_size=0
    )
    tail_start = _write_members(writer, prioritized, landmark=False)
    source.seek(0, 2)
    tail = read_range(source, tail_start, source.tell() - tail_start)
    writer.framed.new_frame()
    writer.raw(tail)  # end-of-archive blocks and record padding, byte for byte
    writer.framed.end_frame()
    framed = writer.framed
    cctx = zstandard.ZstdCompressor(level=compression_level)
    extra: dict[str, Any] = {}
    ts_frame = b""
    tarsplit_raw = b""
    if writer.tarsplit is not None:
        tarsplit_raw = writer.tarsplit.finish()
        ts_frame = cctx.compress(tarsplit_raw)
        extra["tarSplitDigest"] = "sha256:" + hashlib.sha256(ts_frame).hexdigest()
    toc = _toc_json(writer.entries, extra)
    toc_frame = cctx.compress(toc)
    toc_offset = sink.count + SKIPPABLE_HEADER_SIZE
    sink.write(skippable_frame(toc_frame))
    toc_digest = "sha256:" + hashlib.sha256(toc).hexdigest()
    manifest_checksum = "sha256:" + hashlib.sha256(toc_frame).hexdigest()
    position = f"{toc_offset}:{len(toc_frame)}:{len(toc)}:1"
    notes = {
        keys.ESTARGZ_TOC_DIGEST: toc_digest,
        keys.ESTARGZ_UNCOMPRESSED_SIZE: str(framed.raw_total),
    }
    if legacy:
        sink.write(build_zstd_legacy_footer(toc_offset, len(toc_frame), len(toc)))
        notes[keys.LEGACY_ZSTD_MANIFEST_CHECKSUM] = manifest_checksum
        notes[keys.LEGACY_ZSTD_MANIFEST_POSITION] = position
    else:
        ts_offset = sink.count + SKIPPABLE_HEADER_SIZE
        sink.write(skippable_frame(ts_frame))
        sink.write(
            build_zstd_footer(
                toc_offset, len(toc_frame), len(toc), ts_offset, len(ts_frame), len(tarsplit_raw)
            )
        )
        notes[keys.ZSTD_MANIFEST_CHECKSUM] = manifest_checksum
        notes[keys.ZSTD_MANIFEST_POSITION] = position
        notes[keys.ZSTD_TARSPLIT_POSITION] = f"{ts_offset}:{len(ts_frame)}:{len(tarsplit_raw)}"
    result = WriteResult(
        format=fmt,
        digest="sha256:" + sink.sha.hexdigest(),
        size=sink.count,
        diff_id="sha256:" + framed.raw_sha.hexdigest(),
        uncompressed_size=framed.raw_total,
        toc_digest=toc_digest,
        toc_offset=toc_offset,
        toc_length=len(toc_frame),
        entry_count=len(writer.entries),
        annotations=notes,
    )
    log.info(
        "zstd:chunked written format=%s digest=%s size=%d entries=%d",
        fmt.value,
        result.digest,
        result.size,
        result.entry_count,
    )
    return result
