"""The lazy read-only filesystem: seekable layer formats, the FUSE session, the chunk cache.

Never imports ``registry`` or ``snapshotter``: what it needs from a blob is the ``BlobReader``
protocol, which the registry's blob reader satisfies structurally.

The daemon uses ``LazyFilesystem`` (one mount, layers attached as top-level directories),
``LocalFileBlob`` for blobs on disk, and reads layer indexes with ``fusefs.formats``. SOCI
zTOCs of plain gzip layers are read and written with ``parse_ztoc`` / ``build_ztoc``.
``TRACE`` is the process's trace hub: the daemon streams its recordings (``lazysnap trace``).
"""

from fusefs.blob import BlobReader, forget_redirect
from fusefs.cache import CacheUsage, ChunkCache, ChunkIntegrityError
from fusefs.fetcher import FetchConfig, FetchError
from fusefs.filesystem import DEFAULT_CACHE_CAPACITY, LayerUsage, LazyFilesystem
from fusefs.first_reads import FirstRead
from fusefs.formats import (
    DEFAULT_CHUNK_SIZE,
    IndexLimits,
    LayerFormatError,
    VerifiedToc,
    WriteResult,
    build_index_off_loop,
    fetch_verified_toc,
    load_layer_index,
    write_estargz,
    write_zstd_chunked,
)
from fusefs.formats.ztoc import (
    DEFAULT_SPAN_SIZE,
    ZtocBuild,
    ZtocBuildError,
    ZtocLayer,
    build_ztoc,
    parse_ztoc,
)
from fusefs.index import ChunkRef, Codec, EntryAttr, EntryKind, LayerIndex
from fusefs.localblob import LocalFileBlob
from fusefs.slot_mark import SlotMarkError
from fusefs.stats import (
    FETCH_KINDS,
    FsSnapshot,
    Histogram,
    LayerMeters,
    LayerSnapshot,
)
from fusefs.trace import TRACE, FileRead, IndexReadBlob, RangeRead, Recording, TraceHub

__all__ = [
    "DEFAULT_CACHE_CAPACITY",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_SPAN_SIZE",
    "FETCH_KINDS",
    "TRACE",
    "BlobReader",
    "CacheUsage",
    "ChunkCache",
    "ChunkIntegrityError",
    "ChunkRef",
    "Codec",
    "EntryAttr",
    "EntryKind",
    "FetchConfig",
    "FetchError",
    "FileRead",
    "FirstRead",
    "FsSnapshot",
    "Histogram",
    "IndexLimits",
    "IndexReadBlob",
    "LayerFormatError",
    "LayerIndex",
    "LayerMeters",
    "LayerSnapshot",
    "LayerUsage",
    "LazyFilesystem",
    "LocalFileBlob",
    "RangeRead",
    "Recording",
    "SlotMarkError",
    "TraceHub",
    "VerifiedToc",
    "WriteResult",
    "ZtocBuild",
    "ZtocBuildError",
    "ZtocLayer",
    "build_index_off_loop",
    "build_ztoc",
    "fetch_verified_toc",
    "forget_redirect",
    "load_layer_index",
    "parse_ztoc",
    "write_estargz",
    "write_zstd_chunked",
]
