"""Upper bounds that keep a hostile TOC from exhausting memory or CPU."""

from __future__ import annotations

from dataclasses import dataclass, fields

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class IndexLimits:
    """Bounds applied while reading a footer and a TOC; exceeding one is a LayerFormatError.

    The defaults follow containers/storage (a TOC of at most 150 MiB) and leave room for the
    largest real layers (a million entries).
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
    max_span_uncompressed: int = 256 * MiB  # one zTOC span, inflated in memory at once

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"IndexLimits.{field.name} must be positive")
