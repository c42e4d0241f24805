"""What a writer returns: the blob's identity and the annotations its manifest needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from fusefs.formats.footer import LayerFormat


@dataclass(frozen=True, slots=True)
class WriteResult:
    format: LayerFormat
    digest: str  # sha256 of the blob as written: the layer descriptor's digest
    size: int  # blob bytes
    diff_id: str  # sha256 of the decompressed blob, the tar a non-lazy runtime applies
    uncompressed_size: int  # bytes of that tar
    toc_digest: str  # sha256 of the uncompressed TOC JSON
    toc_offset: int  # where the TOC's compressed bytes start
    toc_length: int  # compressed TOC bytes
    entry_count: int  # TOC entries written, counting chunk entries and the landmark
    annotations: dict[str, str] = field(default_factory=dict)
