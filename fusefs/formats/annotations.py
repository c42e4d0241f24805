"""Layer-descriptor annotation keys of the seekable formats."""

from __future__ import annotations

ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ZSTD_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
LEGACY_ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
