"""Upper bounds that keep a hostile TOC from exhausting memory or CPU."""

from __future__ import annotations

from dataclasses import dataclass, fields

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class IndexLimits:
    """Bounds applied while reading a footer and a TOC; exceeding one is a LayerFormatError.

    The defaults follow containers/storage (a TOC of at most 150 MiB) and leave room for the
    largest real layers (a million entries).

    ``max_chunk_size`` bounds what one data chunk decodes to (its ``innerOffset`` plus its
    size), since a read holds a whole chunk in memory and hashes it. stargz-snapshotter cuts
    files into 4 MiB chunks by default and containers/storage into content-defined chunks of
    64 KiB on average, so 64 MiB leaves a wide margin. A ``zeros`` chunk (a hole) decodes
    nothing and is bounded only by the file size.
    """

    max_toc_compressed: int = 150 * MiB
    max_toc_uncompressed: int = 150 * MiB
    max_entries: int = 1_000_000
    max_name_bytes: int = 255  # one path component (NAME_MAX)
    max_path_bytes: int = 4096  # a whole path (PATH_MAX)
    max_depth: int = 256
    max_xattrs_per_entry: int = 128
    max_xattr_value_bytes: int = 64 * 1024
    max_file_size: int = 1 << 42  # 4 TiB
    max_chunks_per_file: int = 1 << 20
    max_chunk_size: int = 64 * MiB
    max_span_uncompressed: int = 256 * MiB  # one zTOC span, inflated in memory at once

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"IndexLimits.{field.name} must be positive")
