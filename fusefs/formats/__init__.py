"""Seekable layer formats: eStargz and zstd:chunked (both variants), read and write.

Readers turn a blob's footer and TOC into a compact, validated ``fusefs.index.LayerIndex``;
``decode_chunk`` turns a chunk's compressed bytes into its content; writers convert a layer tar.
Everything here is pure except ``load_layer_index`` and ``fetch_verified_toc``, which read the
blob.
"""

from fusefs.formats.annotations import (
    ESTARGZ_TOC_DIGEST,
    ESTARGZ_UNCOMPRESSED_SIZE,
    LEGACY_ZSTD_MANIFEST_CHECKSUM,
    LEGACY_ZSTD_MANIFEST_POSITION,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    ZSTD_TARSPLIT_POSITION,
)
from fusefs.formats.chunks import decode_chunk, verify_chunk
from fusefs.formats.compact import CompactLayerIndex
from fusefs.formats.errors import ChunkDecodeError, ChunkDigestError, LayerFormatError
from fusefs.formats.footer import LayerFormat, TocLocation, parse_footer
from fusefs.formats.layer import (
    VerifiedToc,
    build_verified_index,
    index_from_toc,
    location_from_annotations,
    verify_toc,
)
from fusefs.formats.limits import IndexLimits
from fusefs.formats.loader import build_index_off_loop, fetch_verified_toc, load_layer_index
from fusefs.formats.result import WriteResult
from fusefs.formats.writer import DEFAULT_CHUNK_SIZE, write_estargz, write_zstd_chunked

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ESTARGZ_TOC_DIGEST",
    "ESTARGZ_UNCOMPRESSED_SIZE",
    "LEGACY_ZSTD_MANIFEST_CHECKSUM",
    "LEGACY_ZSTD_MANIFEST_POSITION",
    "ZSTD_MANIFEST_CHECKSUM",
    "ZSTD_MANIFEST_POSITION",
    "ZSTD_TARSPLIT_POSITION",
    "ChunkDecodeError",
    "ChunkDigestError",
    "CompactLayerIndex",
    "IndexLimits",
    "LayerFormat",
    "LayerFormatError",
    "TocLocation",
    "VerifiedToc",
    "WriteResult",
    "build_index_off_loop",
    "build_verified_index",
    "decode_chunk",
    "fetch_verified_toc",
    "index_from_toc",
    "load_layer_index",
    "location_from_annotations",
    "parse_footer",
    "verify_chunk",
    "verify_toc",
    "write_estargz",
    "write_zstd_chunked",
]
