"""Convert one downloaded layer blob file to a seekable format (blocking: run it in a thread).

The fusefs writers stream from a file to a file (a compressed input is spooled decompressed to a
temporary file first), so a layer never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fusefs import DEFAULT_CHUNK_SIZE, WriteResult, write_estargz, write_zstd_chunked
from snapshotter.convert_documents import TargetFormat


def convert_layer_file(
    source: Path,
    dest: Path,
    fmt: TargetFormat,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
) -> WriteResult:
    """Write ``source`` (tar, tar+gzip or tar+zstd) as ``fmt`` to ``dest``."""
    with source.open("rb") as tar_in, dest.open("wb") as out:
        if fmt == "estargz":
            result = write_estargz(tar_in, out, chunk_size=chunk_size, prioritized=prioritized)
        else:
            result = write_zstd_chunked(
                tar_in, out, chunk_size=chunk_size, prioritized=prioritized
            )
        out.flush()
    return result
