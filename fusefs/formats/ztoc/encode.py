"""Serialize a zTOC with the generated FlatBuffers builder, in soci's order of calls.

FlatBuffers output depends on the order objects are added; following soci's marshaller call
for call makes the bytes identical to soci's for the same content, so a zTOC's digest does not
depend on which tool wrote it (a test checks soci's own published example digest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flatbuffers

from fusefs.formats.ztoc._fbs import TOC as TocFb
from fusefs.formats.ztoc._fbs import CompressionInfo as InfoFb
from fusefs.formats.ztoc._fbs import FileMetadata as FileFb
from fusefs.formats.ztoc._fbs import Xattr as XattrFb
from fusefs.formats.ztoc._fbs import Ztoc as ZtocFb

ZTOC_VERSION = "0.9"
GZIP_ALGORITHM = 1  # CompressionAlgorithm.Gzip, the schema's default


@dataclass(frozen=True, slots=True)
class ZtocFile:
    """One tar member as a zTOC records it."""

    name: str
    type: str
    offset: int  # first content byte in the uncompressed tar stream
    size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: tuple[tuple[str, str], ...] = ()  # every PAX record, sorted by key


def encode_ztoc(
    *,
    files: Sequence[ZtocFile],
    checkpoints: bytes,
    span_digests: Sequence[str],
    max_span_id: int,
    build_tool: str,
    compressed_size: int,
    uncompressed_size: int,
    version: str = ZTOC_VERSION,
) -> bytes:
    builder = flatbuffers.Builder(0)
    version_at = builder.CreateString(version)
    tool = builder.CreateString(build_tool)
    # soci builds the members from the last to the first.
    members = [_file(builder, file) for file in reversed(files)][::-1]
    TocFb.TOCStartMetadataVector(builder, len(members))
    for member in reversed(members):
        builder.PrependUOffsetTRelative(member)
    metadata = builder.EndVector()
    TocFb.TOCStart(builder)
    TocFb.TOCAddMetadata(builder, metadata)
    toc = TocFb.TOCEnd(builder)
    points = builder.CreateByteVector(checkpoints)
    digests = [builder.CreateString(digest) for digest in span_digests]
    InfoFb.CompressionInfoStartSpanDigestsVector(builder, len(digests))
    for digest in reversed(digests):
        builder.PrependUOffsetTRelative(digest)
    digest_vector = builder.EndVector()
    InfoFb.CompressionInfoStart(builder)
    InfoFb.CompressionInfoAddMaxSpanId(builder, max_span_id)
    InfoFb.CompressionInfoAddSpanDigests(builder, digest_vector)
    InfoFb.CompressionInfoAddCheckpoints(builder, points)
    InfoFb.CompressionInfoAddCompressionAlgorithm(builder, GZIP_ALGORITHM)
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


def _text(builder: Any, value: str) -> int:
    return int(builder.CreateString(value.encode("utf-8", "surrogateescape")))


def _file(builder: Any, file: ZtocFile) -> int:
    name = _text(builder, file.name)
    kind = _text(builder, file.type)
    link = _text(builder, file.linkname)
    uname = _text(builder, file.uname)
    gname = _text(builder, file.gname)
    mod_time = _text(builder, file.mod_time)
    records = []
    for key, value in file.pax:
        key_at = _text(builder, key)
        value_at = _text(builder, value)
        XattrFb.XattrStart(builder)
        XattrFb.XattrAddKey(builder, key_at)
        XattrFb.XattrAddValue(builder, value_at)
        records.append(XattrFb.XattrEnd(builder))
    FileFb.FileMetadataStartXattrsVector(builder, len(records))
    for record in reversed(records):
        builder.PrependUOffsetTRelative(record)
    xattrs = builder.EndVector()
    FileFb.FileMetadataStart(builder)
    FileFb.FileMetadataAddName(builder, name)
    FileFb.FileMetadataAddType(builder, kind)
    FileFb.FileMetadataAddUncompressedOffset(builder, file.offset)
    FileFb.FileMetadataAddUncompressedSize(builder, file.size)
    FileFb.FileMetadataAddLinkname(builder, link)
    FileFb.FileMetadataAddMode(builder, file.mode)
    FileFb.FileMetadataAddUid(builder, file.uid)
    FileFb.FileMetadataAddGid(builder, file.gid)
    FileFb.FileMetadataAddUname(builder, uname)
    FileFb.FileMetadataAddGname(builder, gname)
    FileFb.FileMetadataAddModTime(builder, mod_time)
    FileFb.FileMetadataAddDevmajor(builder, file.devmajor)
    FileFb.FileMetadataAddDevminor(builder, file.devminor)
    FileFb.FileMetadataAddXattrs(builder, xattrs)
    return int(FileFb.FileMetadataEnd(builder))
