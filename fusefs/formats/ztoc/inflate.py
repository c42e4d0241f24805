"""Inflate one span of a gzip layer from its checkpoint, and verify what it gives.

A span starts in the middle of a deflate stream: at a bit offset, with back references into
the 32 KiB before it. Python's ``zlib`` cannot start at a bit offset; three ways around it:

* ``SHIFTED``: shift the span's bits so the stream starts on a byte boundary, then a raw
  inflate with the window as dictionary (stdlib only). This is wrong whenever the span holds
  a stored block, whose data is aligned to the original byte boundaries: zlib then rejects
  the block, or in the worst case decodes garbage that only the length check catches. It is
  kept for the benchmark and the test that shows the failure, never as the default;
* ``PADDED``: put an empty deflate block in front that is exactly as many bits long as the
  partial byte lacks, so every later byte keeps its original alignment (stdlib only);
* ``PRIMED``: the system zlib through ctypes, ``inflatePrime`` with the partial byte's bits
  and ``inflateSetDictionary`` with the window.

All three are measured by ``benchmarks/ztoc_inflate.py``; ``DEFAULT_METHOD`` is the one kept
(the fastest there, and stdlib only). Whatever the method, the result is checked: a span that
is not the last must inflate to exactly the length its checkpoints promise (not a byte more),
and the last must end the gzip stream.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import zlib

from fusefs.formats.errors import ChunkDecodeError, ChunkDigestError, LayerFormatError
from fusefs.formats.ztoc.checkpoints import Checkpoint, SpanTable
from fusefs.formats.ztoc.zlib_binding import Z_NO_FLUSH, Z_OK, Z_STREAM_END, Inflater, ZlibError

_GZIP_MAGIC = b"\x1f\x8b"
_TRAILER = 8  # CRC32 and ISIZE after each gzip member
_PRIMED_PIECE = 4 * 1024 * 1024


class InflateMethod(enum.Enum):
    SHIFTED = "shifted"
    PADDED = "padded"
    PRIMED = "primed"


DEFAULT_METHOD = InflateMethod.PADDED


def inflate_span(
    table: SpanTable,
    span: int,
    compressed: bytes,
    *,
    digest: str | None,
    max_span_bytes: int,
    method: InflateMethod = DEFAULT_METHOD,
) -> bytes:
    """The whole uncompressed content of span ``span``.

    ``compressed`` is the blob range ``table.compressed_range(span)``; ``digest`` is the span's
    ``sha256:<hex>`` from the zTOC, checked first when given. Raises ChunkDigestError or
    ChunkDecodeError (both LayerFormatErrors) instead of returning anything unverified.
    """
    if not 0 <= span < len(table):
        raise LayerFormatError(f"span {span} does not exist")
    start, end = table.compressed_range(span)
    if len(compressed) != end - start:
        raise ChunkDecodeError(
            f"span {span} needs {end - start} compressed bytes, got {len(compressed)}"
        )
    if digest is not None:
        actual = "sha256:" + hashlib.sha256(compressed).hexdigest()
        if actual != digest:
            raise ChunkDigestError(f"span {span} digest mismatch: expected {digest}, got {actual}")
    point = table.checkpoints[span]
    end_offset = table.uncompressed_end(span)
    expected = None if end_offset is None else end_offset - point.uncompressed_offset
    # One byte more than promised: a span that inflates past its end shows it here.
    limit = (max_span_bytes if expected is None else expected) + 1
    data, ended = inflate_from_checkpoint(compressed, point, limit, method)
    if expected is not None and len(data) != expected:
        raise ChunkDecodeError(
            f"span {span} inflates to {len(data)}{'+' if len(data) == limit else ''} bytes, "
            f"its checkpoints promise {expected}"
        )
    if expected is None and not ended:
        raise ChunkDecodeError(f"the last span ({span}) does not end the gzip stream")
    return data


def inflate_from_checkpoint(
    compressed: bytes, point: Checkpoint, limit: int, method: InflateMethod = DEFAULT_METHOD
) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes inflated from ``compressed`` (which starts at the checkpoint's
    partial byte, if any), and whether the gzip stream ended within them."""
    try:
        if method is InflateMethod.PRIMED:
            return _primed(compressed, point, limit)
        if method is InflateMethod.PADDED:
            return _padded(compressed, point, limit)
        return _shifted(compressed, point, limit)
    except (zlib.error, ZlibError) as exc:
        raise ChunkDecodeError(
            f"span is not valid deflate data from its checkpoint: {exc}"
        ) from exc


def _shifted(compressed: bytes, point: Checkpoint, limit: int) -> tuple[bytes, bool]:
    bits = point.bits
    if bits:
        # The span's first bits are the top ``bits`` bits of its first byte; deflate reads
        # bits from the least significant end, so the stream is (rest << bits) | those bits.
        rest = int.from_bytes(compressed[1:], "little")
        aligned = ((rest << bits) | (compressed[0] >> (8 - bits))).to_bytes(
            len(compressed), "little"
        )
    else:
        aligned = compressed
    inflater = zlib.decompressobj(-15, zdict=point.window)
    data = inflater.decompress(aligned, limit)
    if not inflater.eof:
        return data, False
    used = len(aligned) - len(inflater.unused_data)
    member_end = _original_end(compressed, used, bits)
    return _rest_members(data, compressed[member_end:], limit)


def _padded(compressed: bytes, point: Checkpoint, limit: int) -> tuple[bytes, bool]:
    bits = point.bits
    if bits:
        prefix = _EMPTY_BLOCKS[bits]
        # The block fills the low bits of its last byte; the span's own bits stay on top.
        last = prefix[-1] | (compressed[0] & (0xFF << (8 - bits)) & 0xFF)
        aligned = prefix[:-1] + bytes((last,)) + compressed[1:]
        skipped = len(prefix) - 1
    else:
        aligned, skipped = compressed, 0
    inflater = zlib.decompressobj(-15, zdict=point.window)
    data = inflater.decompress(aligned, limit)
    if not inflater.eof:
        return data, False
    used = len(aligned) - len(inflater.unused_data) - skipped
    return _rest_members(data, compressed[used:], limit)


def _empty_block(bits: int) -> bytes:
    """A non-final dynamic-Huffman deflate block with no output whose length in bits is
    congruent to ``8 - bits`` modulo 8; returned padded to whole bytes with zero bits.

    Its literal/length code has the end-of-block symbol only (one code of length 1, which
    zlib accepts), and no distance code. Listing ``extra`` more unused literal/length
    lengths, one bit each, tunes the length.
    """
    extra = (3 - bits) % 8
    stream: list[int] = []

    def field(value: int, width: int) -> None:  # header fields: least significant bit first
        stream.extend((value >> i) & 1 for i in range(width))

    def code(value: int, width: int) -> None:  # Huffman codes: most significant bit first
        stream.extend((value >> i) & 1 for i in reversed(range(width)))

    field(0, 1)  # not the last block
    field(2, 2)  # dynamic Huffman
    field(extra, 5)  # 257 + extra literal/length lengths
    field(0, 5)  # one distance length
    field(18 - 4, 4)  # 18 code length code lengths, enough to reach the one for symbol 1
    lengths = {0: 1, 1: 2, 18: 2}  # canonical codes: 0 -> 0, 1 -> 10, 18 -> 11
    for symbol in (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1):
        field(lengths.get(symbol, 0), 3)
    code(0b11, 2)
    field(138 - 11, 7)  # literals 0..137 unused
    code(0b11, 2)
    field(118 - 11, 7)  # literals 138..255 unused
    code(0b10, 2)  # end of block: length 1
    for _ in range(extra + 1):
        code(0b0, 1)  # the extra literal/length lengths and the distance length: unused
    code(0b0, 1)  # the block itself: just its end
    assert (len(stream) + bits) % 8 == 0
    stream.extend([0] * bits)
    return bytes(
        sum(bit << i for i, bit in enumerate(stream[at : at + 8]))
        for at in range(0, len(stream), 8)
    )


_EMPTY_BLOCKS = {bits: _empty_block(bits) for bits in range(1, 8)}


def _original_end(compressed: bytes, used: int, bits: int) -> int:
    """Where the deflate stream ended in the unshifted bytes, from the shifted bytes consumed.

    Shifting moves the end by ``bits`` bits, so it lies in one of two bytes; only one of them
    is followed by a gzip trailer and then either the blob's end or another gzip header.
    """
    if not bits:
        return used
    for end in (used, used + 1):
        tail = len(compressed) - end
        if tail == _TRAILER or (
            tail > _TRAILER and compressed[end + _TRAILER : end + _TRAILER + 2] == _GZIP_MAGIC
        ):
            return end
    raise ChunkDecodeError("the deflate stream ends where no gzip trailer follows")


def _primed(compressed: bytes, point: Checkpoint, limit: int) -> tuple[bytes, bool]:
    with Inflater(-15) as inflater:
        skip = 0
        if point.bits:
            inflater.prime(point.bits, compressed[0] >> (8 - point.bits))
            skip = 1
        inflater.set_dictionary(point.window)
        inflater.feed(compressed[skip:])
        # The last span's limit is generous: collect the output piecewise, not in one buffer.
        out = ctypes.create_string_buffer(min(limit, _PRIMED_PIECE))
        parts: list[bytes] = []
        written = 0
        code = Z_OK
        while code == Z_OK and written < limit and inflater.avail_in:
            code, count = inflater.inflate_into(out, 0, Z_NO_FLUSH, limit - written)
            parts.append(out.raw[:count])
            written += count
            if count == 0 and code != Z_STREAM_END:
                break
        data = b"".join(parts)
        if code != Z_STREAM_END:
            return data, False
        return _rest_members(data, compressed[skip + inflater.consumed :], limit)


def _rest_members(data: bytes, tail: bytes, limit: int) -> tuple[bytes, bool]:
    """Continue into the gzip members after the first (pigz and friends write several).

    ``tail`` starts at the ended member's trailer. The next members start on byte
    boundaries with an empty window, so plain ``zlib`` reads them.
    """
    if len(tail) < _TRAILER:
        raise ChunkDecodeError("a gzip member ends without its trailer")
    tail = tail[_TRAILER:]
    parts = [data]
    total = len(data)
    while tail:
        if total >= limit:
            return b"".join(parts), False
        inflater = zlib.decompressobj(31)  # gzip mode: consumes the member's trailer too
        piece = inflater.decompress(tail, limit - total)
        parts.append(piece)
        total += len(piece)
        if not inflater.eof:
            return b"".join(parts), False
        tail = inflater.unused_data
    return b"".join(parts), True
