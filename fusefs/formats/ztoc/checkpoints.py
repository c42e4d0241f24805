"""The packed checkpoint list of a gzip zTOC (soci's "zinfo" blob), read and written.

Layout, all little-endian: a header of the checkpoint count (int32) and the span size
(int64), then per checkpoint the compressed offset of its first whole byte (int64), the
uncompressed offset (int64), the number of bits of the byte before it that still belong to
the next block (uint8, 0-7) and the 32 KiB of uncompressed data before it (the window).

Span ``i`` runs from checkpoint ``i`` to checkpoint ``i + 1`` (the last one to the end of the
blob). Its compressed bytes start one byte early when the checkpoint has bits.

Version 1 of the blob left out checkpoint 0 (it was always the end of a 10-byte gzip header);
such a blob is recognised by its length, as soci does, and the checkpoint is restored.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fusefs.formats.errors import LayerFormatError

WINDOW_SIZE = 32 * 1024
_HEADER = struct.Struct("<iq")
_POINT = struct.Struct("<qqB")
POINT_SIZE = _POINT.size + WINDOW_SIZE
# deflate's best case: a 258-byte match costs at least two bits (1032:1), plus slack for the
# block headers of a tiny span.
MAX_DEFLATE_RATIO = 1032
_V1_FIRST_IN = 10
UNUSED_BITS_MAX = 7


@dataclass(frozen=True, slots=True)
class Checkpoint:
    compressed_offset: int  # first whole byte of the span's first block
    uncompressed_offset: int
    bits: int  # bits of the byte at compressed_offset - 1 that start the block
    window: bytes  # the WINDOW_SIZE uncompressed bytes before uncompressed_offset

    @property
    def fetch_offset(self) -> int:
        """First blob byte a span starting here needs (the partial byte, if any)."""
        return self.compressed_offset - (1 if self.bits else 0)


@dataclass(frozen=True, slots=True)
class SpanTable:
    """Checkpoints of one layer, validated against its sizes."""

    span_size: int
    checkpoints: Sequence[Checkpoint]
    compressed_size: int  # the blob's size

    def __len__(self) -> int:
        return len(self.checkpoints)

    def span_at(self, compressed_offset: int) -> int | None:
        """The span whose checkpoint's first whole byte is ``compressed_offset``, if any."""
        points = self.checkpoints
        low, high = 0, len(points)
        while low < high:  # checkpoints are sorted by compressed offset (checked when parsed)
            middle = (low + high) // 2
            if points[middle].compressed_offset < compressed_offset:
                low = middle + 1
            else:
                high = middle
        if low < len(points) and points[low].compressed_offset == compressed_offset:
            return low
        return None

    def compressed_range(self, span: int) -> tuple[int, int]:
        """Blob range ``[start, end)`` holding span ``span``."""
        start = self.checkpoints[span].fetch_offset
        if span + 1 < len(self.checkpoints):
            return start, self.checkpoints[span + 1].compressed_offset
        return start, self.compressed_size

    def uncompressed_end(self, span: int) -> int | None:
        """Where span ``span`` ends in the tar stream; None for the last (it runs to the end)."""
        if span + 1 < len(self.checkpoints):
            return self.checkpoints[span + 1].uncompressed_offset
        return None


def parse_checkpoints(
    blob: bytes, *, compressed_size: int, max_checkpoints: int, max_span_bytes: int
) -> SpanTable:
    """Validate and decode a packed checkpoint list; anything inconsistent is a LayerFormatError."""
    if len(blob) < _HEADER.size:
        raise LayerFormatError(f"checkpoint list of {len(blob)} bytes has no header")
    count, span_size = _HEADER.unpack_from(blob)
    if not 0 < count <= max_checkpoints:
        raise LayerFormatError(f"checkpoint count {count} is out of range")
    if span_size <= 0:
        raise LayerFormatError(f"span size {span_size} is not positive")
    body = len(blob) - _HEADER.size
    if body == count * POINT_SIZE:
        stored, points = count, []
    elif body == (count - 1) * POINT_SIZE:
        stored = count - 1
        points = [Checkpoint(_V1_FIRST_IN, 0, 0, bytes(WINDOW_SIZE))]
    else:
        raise LayerFormatError(
            f"checkpoint list of {len(blob)} bytes does not hold {count} checkpoints "
            f"of {WINDOW_SIZE}-byte windows"
        )
    view = memoryview(blob)
    at = _HEADER.size
    for _ in range(stored):
        compressed, uncompressed, bits = _POINT.unpack_from(blob, at)
        window = bytes(view[at + _POINT.size : at + POINT_SIZE])
        points.append(Checkpoint(compressed, uncompressed, bits, window))
        at += POINT_SIZE
    _check_order(points, compressed_size, max_span_bytes)
    return SpanTable(span_size=span_size, checkpoints=points, compressed_size=compressed_size)


def _check_order(points: list[Checkpoint], compressed_size: int, max_span_bytes: int) -> None:
    if points[0].uncompressed_offset != 0:
        raise LayerFormatError("the first checkpoint is not at the start of the tar stream")
    previous: Checkpoint | None = None
    for point in points:
        if point.bits > UNUSED_BITS_MAX or (point.bits and point.compressed_offset < 1):
            raise LayerFormatError(f"checkpoint has {point.bits} bits at {point.compressed_offset}")
        if not 0 < point.compressed_offset < compressed_size:
            raise LayerFormatError(
                f"checkpoint at blob offset {point.compressed_offset} is outside the blob "
                f"of {compressed_size} bytes"
            )
        if previous is not None:
            packed = point.compressed_offset - previous.fetch_offset
            unpacked = point.uncompressed_offset - previous.uncompressed_offset
            if packed <= 0 or unpacked <= 0:
                raise LayerFormatError("checkpoints are not in increasing order")
            if unpacked > max_span_bytes or unpacked > MAX_DEFLATE_RATIO * packed + WINDOW_SIZE:
                raise LayerFormatError(
                    f"span of {packed} compressed bytes claims {unpacked} uncompressed bytes"
                )
        previous = point


def pack_checkpoints(span_size: int, points: Sequence[Checkpoint]) -> bytes:
    """The current (version 2) packed form: every checkpoint, checkpoint 0 included."""
    out = bytearray(_HEADER.pack(len(points), span_size))
    for point in points:
        if len(point.window) != WINDOW_SIZE:
            raise ValueError("a checkpoint window must be exactly 32 KiB")
        out += _POINT.pack(point.compressed_offset, point.uncompressed_offset, point.bits)
        out += point.window
    return bytes(out)
