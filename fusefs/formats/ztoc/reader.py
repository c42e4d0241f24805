"""Read a SOCI zTOC into a LayerIndex plus its span table (pure: no I/O).

The zTOC's file table gives each member's content as a range of the uncompressed tar stream.
A regular file becomes one chunk per span it touches: the chunk's compressed range is the
span's (from the checkpoint's first whole byte to the next checkpoint), and its inner offset
counts uncompressed bytes from the span's start. ``ZtocLayer.read_chunk`` inflates it.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import logging
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fusefs.formats.builder import build_index
from fusefs.formats.compact import CompactLayerIndex
from fusefs.formats.errors import ChunkDecodeError, LayerFormatError
from fusefs.formats.limits import IndexLimits
from fusefs.formats.ztoc._fbs.Ztoc import Ztoc
from fusefs.formats.ztoc.checkpoints import POINT_SIZE, SpanTable, parse_checkpoints
from fusefs.formats.ztoc.encode import GZIP_ALGORITHM
from fusefs.formats.ztoc.inflate import DEFAULT_METHOD, InflateMethod, inflate_span
from fusefs.formats.ztoc.verify import verify_ztoc_buffer
from fusefs.index import ChunkRef, Codec, EntryAttr

log = logging.getLogger(__name__)


TAR_BLOCK = 512
_SHA256 = re.compile(rb"sha256:[0-9a-f]{64}\Z")
_XATTR_PREFIX = b"SCHILY.xattr."
_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "char", "block", "fifo"})


@dataclass(frozen=True, slots=True)
class ZtocLayer:
    """A verified zTOC: the layer's file tree and how to inflate any span of its blob."""

    index: CompactLayerIndex
    spans: SpanTable
    span_digests: tuple[str, ...] | None  # sha256 of each span's compressed bytes
    ztoc_digest: str
    version: str
    build_tool: str
    uncompressed_size: int
    max_span_bytes: int

    # The LayerIndex protocol, by delegation: the filesystem serves a ZtocLayer as it is, and
    # the fetcher finds the span table it needs to inflate a chunk on the same object.
    @property
    def codec(self) -> Codec:
        return self.index.codec

    @property
    def entry_count(self) -> int:
        return self.index.entry_count

    @property
    def toc_digest(self) -> str:
        return self.index.toc_digest

    @property
    def prefetch_end(self) -> int | None:
        return self.index.prefetch_end

    @property
    def toc_trusted(self) -> bool:
        return self.index.toc_trusted

    def attr(self, entry: int) -> EntryAttr:
        return self.index.attr(entry)

    def lookup(self, parent: int, name: bytes) -> int | None:
        return self.index.lookup(parent, name)

    def children(self, directory: int) -> Sequence[tuple[bytes, int]]:
        return self.index.children(directory)

    def parent(self, entry: int) -> int:
        return self.index.parent(entry)

    def path(self, entry: int) -> str:
        return self.index.path(entry)

    def readlink(self, entry: int) -> bytes:
        return self.index.readlink(entry)

    def xattrs(self, entry: int) -> dict[bytes, bytes]:
        return self.index.xattrs(entry)

    def chunks(self, entry: int) -> Sequence[ChunkRef]:
        return self.index.chunks(entry)

    def file_entries(self) -> Sequence[int]:
        return self.index.file_entries()

    def span_of(self, ref: ChunkRef) -> int:
        """The span a chunk of ``index`` lies in."""
        span = self.spans.span_at(ref.blob_offset)
        if span is None:
            raise LayerFormatError(f"no span starts at blob offset {ref.blob_offset}")
        return span

    def fetch_range(self, ref: ChunkRef) -> tuple[int, int]:
        """The blob range to read for ``ref``: its whole span, partial first byte included."""
        return self.spans.compressed_range(self.span_of(ref))

    def inflate(
        self, span: int, compressed: bytes, method: InflateMethod = DEFAULT_METHOD
    ) -> bytes:
        """The verified uncompressed bytes of span ``span`` from its compressed bytes."""
        digest = self.span_digests[span] if self.span_digests is not None else None
        return inflate_span(
            self.spans,
            span,
            compressed,
            digest=digest,
            max_span_bytes=self.max_span_bytes,
            method=method,
        )

    def read_chunk(self, ref: ChunkRef, compressed: bytes) -> bytes:
        """A chunk's ``ref.size`` bytes; ``compressed`` is the blob's ``fetch_range(ref)``."""
        data = self.inflate(self.span_of(ref), compressed)
        end = ref.inner_offset + ref.size
        if end > len(data):
            raise ChunkDecodeError(
                f"chunk at blob offset {ref.blob_offset} needs {end} bytes of its span, "
                f"which has {len(data)}"
            )
        return data[ref.inner_offset : end]


def parse_ztoc(
    data: bytes,
    *,
    blob_size: int,
    ztoc_digest: str | None = None,
    limits: IndexLimits | None = None,
) -> ZtocLayer:
    """Verify and index a serialized zTOC for a gzip blob of ``blob_size`` bytes.

    ``ztoc_digest`` is the zTOC's digest from a trusted manifest (the SOCI index); when given
    it must match, and the index is marked trusted. Raises LayerFormatError for anything
    malformed, inconsistent, hostile or over a limit.
    """
    limits = limits or IndexLimits()
    if len(data) > limits.max_toc_compressed:
        raise LayerFormatError(f"zTOC of {len(data)} bytes exceeds the limit")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if ztoc_digest is not None and ztoc_digest != actual:
        raise LayerFormatError(f"zTOC digest mismatch: expected {ztoc_digest}, got {actual}")
    verify_ztoc_buffer(data, max_vector=limits.max_entries)
    try:
        return _parse(data, blob_size, actual, ztoc_digest is not None, limits)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, LayerFormatError):
            raise
        raise LayerFormatError(f"zTOC is malformed: {exc}") from exc


def _parse(
    data: bytes, blob_size: int, digest: str, trusted: bool, limits: IndexLimits
) -> ZtocLayer:
    root = Ztoc.GetRootAs(data, 0)
    info = root.CompressionInfo()
    toc = root.Toc()
    if info is None or toc is None:
        raise LayerFormatError("zTOC lacks its TOC or compression info")
    if info.CompressionAlgorithm() != GZIP_ALGORITHM:
        raise LayerFormatError(f"zTOC compression {info.CompressionAlgorithm()} is not gzip")
    compressed_size = root.CompressedArchiveSize()
    uncompressed_size = root.UncompressedArchiveSize()
    if compressed_size != blob_size:
        raise LayerFormatError(
            f"zTOC describes a blob of {compressed_size} bytes, the layer has {blob_size}"
        )
    if not 0 <= uncompressed_size <= (1 << 62):
        raise LayerFormatError(f"zTOC uncompressed size {uncompressed_size} is out of range")
    spans = parse_checkpoints(
        _checkpoint_bytes(info),
        compressed_size=blob_size,
        max_checkpoints=max(1, limits.max_toc_compressed // POINT_SIZE),
        max_span_bytes=limits.max_span_uncompressed,
    )
    if info.MaxSpanId() != len(spans) - 1:
        raise LayerFormatError(
            f"zTOC max span id {info.MaxSpanId()} does not match {len(spans)} checkpoints"
        )
    span_digests = _span_digests(info, len(spans))
    entries = list(_entries(toc, spans, uncompressed_size, limits))
    index = build_index(
        entries,
        codec=Codec.GZIP_SPANS,
        toc_digest=digest,
        payload_end=blob_size,
        limits=limits,
        toc_trusted=trusted,
        chunk_digests=False,
    )
    log.debug("ztoc indexed entries=%d spans=%d digest=%s", index.entry_count, len(spans), digest)
    return ZtocLayer(
        index=index,
        spans=spans,
        span_digests=span_digests,
        ztoc_digest=digest,
        version=(root.Version() or b"").decode("utf-8", "replace"),
        build_tool=(root.BuildToolIdentifier() or b"").decode("utf-8", "replace"),
        uncompressed_size=uncompressed_size,
        max_span_bytes=limits.max_span_uncompressed,
    )


def _checkpoint_bytes(info: Any) -> bytes:
    """The checkpoints vector as bytes, without numpy (which the runtime would otherwise use)."""
    tab = info._tab
    field = tab.Offset(10)
    if field == 0:
        raise LayerFormatError("zTOC has no checkpoints")
    start = tab.Vector(field)
    return bytes(tab.Bytes[start : start + tab.VectorLen(field)])


def _span_digests(info: Any, spans: int) -> tuple[str, ...] | None:
    count = info.SpanDigestsLength()
    if count == 0:
        return None
    if count != spans:
        raise LayerFormatError(f"zTOC has {count} span digests for {spans} spans")
    digests = []
    for i in range(count):
        value = info.SpanDigests(i)
        if not _SHA256.match(value):
            raise LayerFormatError(f"zTOC span digest {value!r} is not a sha256 digest")
        digests.append(value.decode())
    return tuple(digests)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "surrogateescape")


def _entries(
    toc: Any, spans: SpanTable, uncompressed_size: int, limits: IndexLimits
) -> Iterator[dict[str, Any]]:
    """The zTOC file table as TOC entries for the shared builder, in tar order."""
    count = toc.MetadataLength()
    if count > limits.max_entries:
        raise LayerFormatError(f"zTOC has {count} entries, over the limit")
    members = [toc.Metadata(i) for i in range(count)]
    offsets = [m.UncompressedOffset() for m in members]
    order = sorted(range(count), key=offsets.__getitem__)
    starts = [p.uncompressed_offset for p in spans.checkpoints]
    next_header = 0
    for i in order:
        member = members[i]
        offset, size = offsets[i], member.UncompressedSize()
        name = _text(member.Name())
        if not 0 <= size <= limits.max_file_size or offset < next_header + TAR_BLOCK:
            raise LayerFormatError(f"zTOC entry {name!r} overlaps the one before it")
        if offset + size > uncompressed_size:
            raise LayerFormatError(f"zTOC entry {name!r} runs past the tar stream")
        next_header = offset + size + -(offset + size) % TAR_BLOCK
        typ = _text(member.Type())
        if typ not in _TYPES:
            raise LayerFormatError(f"zTOC entry {name!r} has unknown type {typ!r}")
        if name.startswith("/"):
            raise LayerFormatError(f"zTOC entry {name!r} is an absolute path")
        entry: dict[str, Any] = {
            "name": name,
            "type": typ,
            "mode": member.Mode(),
            "uid": member.Uid(),
            "gid": member.Gid(),
            "modtime": _text(member.ModTime()),
            "linkName": _text(member.Linkname()),
            "devMajor": member.Devmajor(),
            "devMinor": member.Devminor(),
        }
        xattrs = _xattrs(member, name, limits)
        if xattrs:
            entry["xattrs"] = xattrs
        if typ != "reg":
            yield entry
            continue
        entry["size"] = size
        chunks = _chunks(offset, size, spans, starts)
        if chunks:
            last_span = chunks[-1][0]
            entry.update(offset=chunks[0][2], innerOffset=chunks[0][3])
            entry["endOffset"] = spans.compressed_range(last_span)[1]
        yield entry
        for _, chunk_offset, blob_offset, inner in chunks[1:]:
            yield {
                "name": name,
                "type": "chunk",
                "chunkOffset": chunk_offset,
                "offset": blob_offset,
                "innerOffset": inner,
            }


def _xattrs(member: Any, name: str, limits: IndexLimits) -> dict[str, str]:
    """The extended attributes among a member's PAX records (SCHILY.xattr.*), base64 values."""
    count = member.XattrsLength()
    if count > 4 * limits.max_xattrs_per_entry:  # PAX records include a few non-xattrs
        raise LayerFormatError(f"zTOC entry {name!r} has {count} PAX records, over the limit")
    found: dict[str, str] = {}
    for i in range(count):
        record = member.Xattrs(i)
        key = record.Key() or b""
        if key.startswith(_XATTR_PREFIX):
            xattr = key[len(_XATTR_PREFIX) :].decode("utf-8", "surrogateescape")
            found[xattr] = base64.b64encode(record.Value() or b"").decode()
    return found


def _chunks(
    offset: int, size: int, spans: SpanTable, starts: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """One chunk per span that ``[offset, offset + size)`` of the tar stream touches:
    (span, offset in the file, blob offset of the span, offset inside the span)."""
    chunks: list[tuple[int, int, int, int]] = []
    position = offset
    span = bisect.bisect_right(starts, offset) - 1
    while position < offset + size:
        point = spans.checkpoints[span]
        chunks.append(
            (span, position - offset, point.compressed_offset, position - point.uncompressed_offset)
        )
        end = spans.uncompressed_end(span)
        if end is None:
            break
        position = end
        span += 1
    return chunks
