"""load_layer_index: the only part of the formats that reads a blob."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from fusefs.blob import BlobReader
from fusefs.formats.errors import LayerFormatError
from fusefs.formats.footer import parse_footer
from fusefs.formats.heap import release_free_heap
from fusefs.formats.layer import (
    VerifiedToc,
    build_verified_index,
    location_from_annotations,
    verify_toc,
)
from fusefs.formats.limits import IndexLimits
from fusefs.index import LayerIndex

log = logging.getLogger(__name__)

# One read of the blob's tail usually holds the footer and the whole (compressed) TOC.
TAIL_READ_SIZE = 512 * 1024
# Compressed TOCs below this, roughly 1k entries, are parsed on the calling task directly.
INLINE_PARSE_LIMIT = 64 * 1024


async def load_layer_index(
    blob: BlobReader,
    *,
    toc_digest: str | None = None,
    annotations: Mapping[str, str] | None = None,
    limits: IndexLimits | None = None,
) -> LayerIndex:
    """Read, verify and index a seekable layer's TOC (``fetch_verified_toc``, then
    ``build_index_off_loop``)."""
    toc = await fetch_verified_toc(blob, toc_digest=toc_digest, annotations=annotations,
                                   limits=limits)
    return await build_index_off_loop(toc)


async def build_index_off_loop(
    toc: VerifiedToc, *, inline_limit: int = INLINE_PARSE_LIMIT
) -> LayerIndex:
    """Index a verified TOC; one whose compressed size is at least ``inline_limit`` in a worker
    thread. Raises LayerFormatError. A build nobody waits for passes 0: even a small TOC's
    build (~0.2 s for 8k entries) would hold the event loop, and with it the RPC answers."""

    def build() -> LayerIndex:
        index = build_verified_index(toc)
        release_free_heap()
        return index

    if toc.location.toc_length < inline_limit:
        return build()
    # A large TOC takes ~12 us per entry of pure-Python work: parse it in a worker thread so
    # the event loop keeps answering the attached layers' FUSE requests between GIL switches.
    return await trio.to_thread.run_sync(build)


async def fetch_verified_toc(
    blob: BlobReader,
    *,
    toc_digest: str | None = None,
    annotations: Mapping[str, str] | None = None,
    limits: IndexLimits | None = None,
) -> VerifiedToc:
    """Read a seekable layer's TOC with one or two ranged reads and check its digests.

    When the annotations give the TOC position (zstd:chunked), the footer is not read at all.
    Otherwise the last ``TAIL_READ_SIZE`` bytes are read; the TOC is sliced from them when it
    fits, else fetched with one more read. Raises LayerFormatError for anything malformed.
    """
    limits = limits or IndexLimits()
    size = blob.size
    if size <= 0:
        raise LayerFormatError("blob is empty")
    location = location_from_annotations(annotations, size)
    tail = b""
    tail_start = size
    if location is None:
        tail_start = max(0, size - TAIL_READ_SIZE)
        tail = await blob.read_at(tail_start, size - tail_start)
        _check_length(tail, size - tail_start)
        location = parse_footer(tail, size)
    if location.toc_length > limits.max_toc_compressed:
        raise LayerFormatError(
            f"compressed TOC of {location.toc_length} bytes exceeds the limit "
            f"{limits.max_toc_compressed}"
        )
    if location.toc_offset >= tail_start:
        start = location.toc_offset - tail_start
        compressed = tail[start : start + location.toc_length]
        reads = 1
    else:
        compressed = await blob.read_at(location.toc_offset, location.toc_length)
        _check_length(compressed, location.toc_length)
        reads = 1 if not tail else 2
    del tail
    log.debug(
        "toc fetched blob=%s format=%s toc_bytes=%d reads=%d",
        blob.digest,
        location.format.value,
        location.toc_length,
        reads,
    )

    def verify() -> VerifiedToc:
        return verify_toc(
            location, compressed, toc_digest=toc_digest, annotations=annotations, limits=limits
        )

    if location.toc_length < INLINE_PARSE_LIMIT:
        return verify()
    # Decompressing and hashing a large TOC are C calls that release the GIL.
    return await trio.to_thread.run_sync(verify)


def _check_length(data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise LayerFormatError(f"blob read returned {len(data)} bytes, expected {expected}")
