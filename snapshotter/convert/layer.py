"""Convert one downloaded layer blob file to a seekable format. It blocks: run it in a thread.

The fusefs writers stream from a file to a file, so a layer never has to fit in memory. A
compressed input is first spooled decompressed to a temporary file.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import zstandard

from fusefs import DEFAULT_CHUNK_SIZE, WriteResult, write_estargz, write_zstd_chunked
from snapshotter.convert.documents import TargetFormat

# What reading a corrupt or unusual layer raises: the writers' ValueError, e.g. for sparse
# members; truncated streams; tar errors; gzip's OSError; zlib and zstd errors.
_BAD_LAYER_ERRORS = (
    ValueError, EOFError, OSError, tarfile.TarError, zlib.error, zstandard.ZstdError
)


class UnreadableLayerError(Exception):
    """The layer's content cannot be converted, although it matched its digest."""


def convert_layer_file(
    source: Path,
    dest: Path,
    fmt: TargetFormat,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: Sequence[str] = (),
) -> WriteResult:
    """Write ``source``, a tar, tar+gzip or tar+zstd, as ``fmt`` to ``dest``."""
    with source.open("rb") as tar_in, dest.open("wb") as out:
        try:
            if fmt == "estargz":
                result = write_estargz(
                    tar_in, out, chunk_size=chunk_size, prioritized=prioritized
                )
            else:
                result = write_zstd_chunked(
                    tar_in, out, chunk_size=chunk_size, prioritized=prioritized
                )
        except _BAD_LAYER_ERRORS as exc:
            raise UnreadableLayerError(str(exc) or type(exc).__name__) from exc
        out.flush()
    return result
