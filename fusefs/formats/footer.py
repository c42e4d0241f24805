"""Footers of seekable layer blobs: parse (pure) and build.

Three footers are recognised from the blob's tail:

* eStargz: a 51-byte empty gzip member whose FEXTRA subfield ``SG`` holds ``%016x`` of the TOC
  offset followed by ``STARGZ``, and the older 47-byte variant without the subfield header;
* zstd:chunked v2 (containers/storage): a skippable frame holding 64 bytes of little-endian
  uint64s ending in the magic ``GNUlInUx``, with a tar-split frame position;
* zstd:chunked legacy (stargz-snapshotter): a skippable frame holding 40 bytes ending in the
  magic ``GnUlInUx``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from fusefs.formats.errors import LayerFormatError

ESTARGZ_FOOTER_SIZE = 51
ESTARGZ_LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 64
ZSTD_LEGACY_FOOTER_SIZE = 40
SKIPPABLE_HEADER_SIZE = 8
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_MAGIC = b"GNUlInUx"
ZSTD_LEGACY_MAGIC = b"GnUlInUx"
MANIFEST_TYPE_CRFS = 1
# The longest footer including its skippable-frame header: what the tail read must cover.
MAX_FOOTER_SIZE = SKIPPABLE_HEADER_SIZE + ZSTD_FOOTER_SIZE

_GZIP_ID = b"\x1f\x8b\x08"
_FEXTRA = 0x04
_STARGZ_SUFFIX = b"STARGZ"
_EXTERNAL_TOC = b"STARGZEXTERNALTOC"
_HEX = frozenset(b"0123456789abcdef")


class LayerFormat(enum.Enum):
    ESTARGZ = "estargz"
    ZSTD_CHUNKED = "zstd:chunked"  # containers/storage, 64-byte footer, tar-split
    ZSTD_CHUNKED_LEGACY = "zstd:chunked-legacy"  # stargz-snapshotter, 40-byte footer


@dataclass(frozen=True, slots=True)
class TocLocation:
    """Where a blob's TOC lives and where its payload area ends."""

    format: LayerFormat
    toc_offset: int  # first byte of the compressed TOC; for eStargz, of its gzip member
    toc_length: int  # compressed TOC bytes
    toc_uncompressed: int | None  # zstd:chunked only
    payload_end: int  # file payloads lie in [0, payload_end)
    footer_size: int  # bytes at the end of the blob taken by the footer and its frame header
    tarsplit_offset: int | None = None
    tarsplit_length: int | None = None
    tarsplit_uncompressed: int | None = None


def parse_footer(tail: bytes, blob_size: int) -> TocLocation:
    """Find the TOC from the last bytes of a blob; ``tail`` ends at ``blob_size``."""
    if len(tail) > blob_size:
        raise LayerFormatError("footer tail is longer than the blob")
    if tail.endswith(ZSTD_MAGIC) and len(tail) >= SKIPPABLE_HEADER_SIZE + ZSTD_FOOTER_SIZE:
        return _parse_zstd(tail, blob_size)
    if tail.endswith(ZSTD_LEGACY_MAGIC) and len(tail) >= (
        SKIPPABLE_HEADER_SIZE + ZSTD_LEGACY_FOOTER_SIZE
    ):
        return _parse_zstd_legacy(tail, blob_size)
    if len(tail) >= ESTARGZ_FOOTER_SIZE and _looks_like_estargz(tail[-ESTARGZ_FOOTER_SIZE:], 26):
        return _parse_estargz(tail[-ESTARGZ_FOOTER_SIZE:], blob_size)
    if len(tail) >= ESTARGZ_LEGACY_FOOTER_SIZE and _looks_like_estargz(
        tail[-ESTARGZ_LEGACY_FOOTER_SIZE:], 22
    ):
        return _parse_estargz(tail[-ESTARGZ_LEGACY_FOOTER_SIZE:], blob_size)
    if _EXTERNAL_TOC in tail[-64:]:
        raise LayerFormatError("eStargz with an external TOC is not supported")
    raise LayerFormatError("no eStargz or zstd:chunked footer at the end of the blob")


def _looks_like_estargz(footer: bytes, xlen: int) -> bool:
    return (
        footer.startswith(_GZIP_ID)
        and bool(footer[3] & _FEXTRA)
        and struct.unpack_from("<H", footer, 10)[0] == xlen
    )


def _parse_estargz(footer: bytes, blob_size: int) -> TocLocation:
    (xlen,) = struct.unpack_from("<H", footer, 10)
    if len(footer) == ESTARGZ_FOOTER_SIZE:
        if xlen != 26 or footer[12:14] != b"SG" or struct.unpack_from("<H", footer, 14)[0] != 22:
            raise LayerFormatError("malformed eStargz footer extra field")
        field = footer[16:38]
    else:
        if xlen != 22:
            raise LayerFormatError("malformed legacy eStargz footer extra field")
        field = footer[12:34]
    hex_offset, suffix = field[:16], field[16:]
    if suffix != _STARGZ_SUFFIX or not set(hex_offset) <= _HEX:
        raise LayerFormatError("malformed eStargz footer TOC offset")
    toc_offset = int(hex_offset, 16)
    footer_start = blob_size - len(footer)
    if toc_offset >= footer_start:
        raise LayerFormatError(
            f"eStargz TOC offset {toc_offset} is not before the footer at {footer_start}"
        )
    return TocLocation(
        format=LayerFormat.ESTARGZ,
        toc_offset=toc_offset,
        toc_length=footer_start - toc_offset,
        toc_uncompressed=None,
        payload_end=toc_offset,
        footer_size=len(footer),
    )


def _check_skippable_header(header: bytes, length: int) -> None:
    if header[:4] != SKIPPABLE_MAGIC or struct.unpack("<I", header[4:8])[0] != length:
        raise LayerFormatError("zstd:chunked footer is not in a skippable frame of its size")


def _check_range(what: str, offset: int, length: int, limit: int) -> None:
    if offset < SKIPPABLE_HEADER_SIZE or length <= 0 or offset + length > limit:
        raise LayerFormatError(
            f"zstd:chunked {what} range {offset}+{length} is outside the blob (limit {limit})"
        )


def _parse_zstd(tail: bytes, blob_size: int) -> TocLocation:
    frame = tail[-(SKIPPABLE_HEADER_SIZE + ZSTD_FOOTER_SIZE) :]
    _check_skippable_header(frame[:SKIPPABLE_HEADER_SIZE], ZSTD_FOOTER_SIZE)
    toc_off, toc_len, toc_raw, kind, ts_off, ts_len, ts_raw = struct.unpack_from(
        "<7Q", frame, SKIPPABLE_HEADER_SIZE
    )
    if kind != MANIFEST_TYPE_CRFS:
        raise LayerFormatError(f"unknown zstd:chunked manifest type {kind}")
    footer_start = blob_size - len(frame)
    _check_range("TOC", toc_off, toc_len, footer_start)
    _check_range("tar-split", ts_off, ts_len, footer_start)
    if ts_off < toc_off + toc_len:
        raise LayerFormatError("zstd:chunked tar-split frame overlaps the TOC")
    return TocLocation(
        format=LayerFormat.ZSTD_CHUNKED,
        toc_offset=toc_off,
        toc_length=toc_len,
        toc_uncompressed=toc_raw,
        payload_end=toc_off - SKIPPABLE_HEADER_SIZE,
        footer_size=len(frame),
        tarsplit_offset=ts_off,
        tarsplit_length=ts_len,
        tarsplit_uncompressed=ts_raw,
    )


def _parse_zstd_legacy(tail: bytes, blob_size: int) -> TocLocation:
    frame = tail[-(SKIPPABLE_HEADER_SIZE + ZSTD_LEGACY_FOOTER_SIZE) :]
    _check_skippable_header(frame[:SKIPPABLE_HEADER_SIZE], ZSTD_LEGACY_FOOTER_SIZE)
    toc_off, toc_len, toc_raw, kind = struct.unpack_from("<4Q", frame, SKIPPABLE_HEADER_SIZE)
    if kind != MANIFEST_TYPE_CRFS:
        raise LayerFormatError(f"unknown zstd:chunked manifest type {kind}")
    footer_start = blob_size - len(frame)
    _check_range("TOC", toc_off, toc_len, footer_start)
    return TocLocation(
        format=LayerFormat.ZSTD_CHUNKED_LEGACY,
        toc_offset=toc_off,
        toc_length=toc_len,
        toc_uncompressed=toc_raw,
        payload_end=toc_off - SKIPPABLE_HEADER_SIZE,
        footer_size=len(frame),
    )


def zstd_location(
    fmt: LayerFormat, toc_off: int, toc_len: int, toc_raw: int, blob_size: int
) -> TocLocation:
    """A TOC location taken from manifest annotations instead of the footer."""
    _check_range("TOC", toc_off, toc_len, blob_size)
    return TocLocation(
        format=fmt,
        toc_offset=toc_off,
        toc_length=toc_len,
        toc_uncompressed=toc_raw,
        payload_end=toc_off - SKIPPABLE_HEADER_SIZE,
        footer_size=0,
    )


# --- building (writers) ---------------------------------------------------------------------


def build_estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer: an empty gzip member carrying the TOC offset."""
    extra = b"SG" + struct.pack("<H", 22) + b"%016x" % toc_offset + _STARGZ_SUFFIX
    header = _GZIP_ID + bytes([_FEXTRA]) + b"\x00\x00\x00\x00" + b"\x00\xff"
    body = b"\x01\x00\x00\xff\xff" + b"\x00" * 8  # empty stored final block, CRC32=0, ISIZE=0
    footer = header + struct.pack("<H", len(extra)) + extra + body
    assert len(footer) == ESTARGZ_FOOTER_SIZE
    return footer


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def build_zstd_footer(
    toc_off: int, toc_len: int, toc_raw: int, ts_off: int, ts_len: int, ts_raw: int
) -> bytes:
    """The v2 footer including its skippable-frame header (72 bytes)."""
    data = struct.pack("<7Q", toc_off, toc_len, toc_raw, MANIFEST_TYPE_CRFS, ts_off, ts_len, ts_raw)
    return skippable_frame(data + ZSTD_MAGIC)


def build_zstd_legacy_footer(toc_off: int, toc_len: int, toc_raw: int) -> bytes:
    """The legacy footer including its skippable-frame header (48 bytes)."""
    data = struct.pack("<4Q", toc_off, toc_len, toc_raw, MANIFEST_TYPE_CRFS)
    return skippable_frame(data + ZSTD_LEGACY_MAGIC)
