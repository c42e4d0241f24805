"""Helpers for zTOC tests: encode an arbitrary (possibly hostile) zTOC with the generated
builder, and read a file of a ZtocLayer through span inflation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import flatbuffers

from fusefs.formats.ztoc import InflateMethod, ZtocLayer
from fusefs.formats.ztoc._fbs import TOC as TocFb
from fusefs.formats.ztoc._fbs import CompressionInfo as InfoFb
from fusefs.formats.ztoc._fbs import FileMetadata as FileFb
from fusefs.formats.ztoc._fbs import Xattr as XattrFb
from fusefs.formats.ztoc._fbs import Ztoc as ZtocFb
from fusefs.index import LayerIndex


@dataclass
class FileSpec:
    name: str
    type: str = "reg"
    offset: int = 512
    size: int = 0
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mod_time: str = "2024-01-01T00:00:00Z"
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, bytes] = field(default_factory=dict)


def encode_ztoc(
    files: Sequence[FileSpec],
    checkpoints: bytes,
    *,
    compressed_size: int,
    uncompressed_size: int,
    max_span_id: int,
    span_digests: Sequence[str] = (),
    algorithm: int = 1,
    version: str = "0.9",
) -> bytes:
    builder = flatbuffers.Builder(1024)
    version_at = builder.CreateString(version)
    tool = builder.CreateString("test")
    offsets = []
    for spec in files:
        strings = [
            builder.CreateString(s.encode("utf-8", "surrogateescape"))
            for s in (spec.name, spec.type, spec.linkname, "", "", spec.mod_time)
        ]
        records = []
        for key, value in spec.pax.items():
            k, v = builder.CreateString(key), builder.CreateString(value)
            XattrFb.XattrStart(builder)
            XattrFb.XattrAddKey(builder, k)
            XattrFb.XattrAddValue(builder, v)
            records.append(XattrFb.XattrEnd(builder))
        FileFb.FileMetadataStartXattrsVector(builder, len(records))
        for record in reversed(records):
            builder.PrependUOffsetTRelative(record)
        xattrs = builder.EndVector()
        FileFb.FileMetadataStart(builder)
        FileFb.FileMetadataAddName(builder, strings[0])
        FileFb.FileMetadataAddType(builder, strings[1])
        FileFb.FileMetadataAddUncompressedOffset(builder, spec.offset)
        FileFb.FileMetadataAddUncompressedSize(builder, spec.size)
        FileFb.FileMetadataAddLinkname(builder, strings[2])
        FileFb.FileMetadataAddMode(builder, spec.mode)
        FileFb.FileMetadataAddUid(builder, spec.uid)
        FileFb.FileMetadataAddGid(builder, spec.gid)
        FileFb.FileMetadataAddModTime(builder, strings[5])
        FileFb.FileMetadataAddDevmajor(builder, spec.devmajor)
        FileFb.FileMetadataAddDevminor(builder, spec.devminor)
        FileFb.FileMetadataAddXattrs(builder, xattrs)
        offsets.append(FileFb.FileMetadataEnd(builder))
    TocFb.TOCStartMetadataVector(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    metadata = builder.EndVector()
    TocFb.TOCStart(builder)
    TocFb.TOCAddMetadata(builder, metadata)
    toc = TocFb.TOCEnd(builder)
    points = builder.CreateByteVector(checkpoints)
    digests = [builder.CreateString(d) for d in span_digests]
    InfoFb.CompressionInfoStartSpanDigestsVector(builder, len(digests))
    for digest in reversed(digests):
        builder.PrependUOffsetTRelative(digest)
    digest_vector = builder.EndVector()
    InfoFb.CompressionInfoStart(builder)
    InfoFb.CompressionInfoAddCompressionAlgorithm(builder, algorithm)
    InfoFb.CompressionInfoAddMaxSpanId(builder, max_span_id)
    InfoFb.CompressionInfoAddSpanDigests(builder, digest_vector)
    InfoFb.CompressionInfoAddCheckpoints(builder, points)
    info = InfoFb.CompressionInfoEnd(builder)
    ZtocFb.ZtocStart(builder)
    ZtocFb.ZtocAddVersion(builder, version_at)
    ZtocFb.ZtocAddBuildToolIdentifier(builder, tool)
    ZtocFb.ZtocAddToc(builder, toc)
    ZtocFb.ZtocAddCompressedArchiveSize(builder, compressed_size)
    ZtocFb.ZtocAddUncompressedArchiveSize(builder, uncompressed_size)
    ZtocFb.ZtocAddCompressionInfo(builder, info)
    builder.Finish(ZtocFb.ZtocEnd(builder))
    return bytes(builder.Output())


def read_ztoc_file(
    layer: ZtocLayer, blob: bytes, entry: int, method: InflateMethod | None = None
) -> bytes:
    """A regular file's content, each chunk inflated from its span's checkpoint."""
    parts = []
    expected = 0
    for ref in layer.index.chunks(entry):
        assert ref.file_offset == expected
        start, end = layer.fetch_range(ref)
        if method is None:
            parts.append(layer.read_chunk(ref, blob[start:end]))
        else:
            span = layer.inflate(layer.span_of(ref), blob[start:end], method)
            parts.append(span[ref.inner_offset : ref.inner_offset + ref.size])
        expected += ref.size
    return b"".join(parts)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def lookup(index: LayerIndex, path: str) -> int:
    entry = 0
    for part in path.split("/"):
        found = index.lookup(entry, part.encode())
        assert found is not None, path
        entry = found
    return entry
