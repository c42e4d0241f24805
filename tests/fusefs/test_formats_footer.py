"""Footer parsing: every variant from its byte layout, and fuzzed tails."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusefs.formats import LayerFormat, LayerFormatError, parse_footer
from fusefs.formats.footer import (
    ESTARGZ_FOOTER_SIZE,
    build_estargz_footer,
    build_zstd_footer,
    build_zstd_legacy_footer,
)
from tests.fusefs.formats_support import decompress_gzip_stream, legacy_estargz_footer
from tests.fuzzing import fuzz_settings


def test_estargz_footer_layout() -> None:
    footer = build_estargz_footer(0x1234)
    assert len(footer) == ESTARGZ_FOOTER_SIZE == 51
    assert footer[16:38] == b"0000000000001234STARGZ"
    assert decompress_gzip_stream(footer) == b""  # an empty gzip member
    location = parse_footer(b"\0" * 0x2000 + footer, 0x2000 + 51)
    assert location.format is LayerFormat.ESTARGZ
    assert (location.toc_offset, location.toc_length) == (0x1234, 0x2000 - 0x1234)
    assert location.payload_end == 0x1234


def test_legacy_estargz_footer() -> None:
    footer = legacy_estargz_footer(100)
    assert len(footer) == 47
    assert decompress_gzip_stream(footer) == b""
    location = parse_footer(b"\0" * 200 + footer, 247)
    assert location.format is LayerFormat.ESTARGZ
    assert (location.toc_offset, location.toc_length, location.footer_size) == (100, 100, 47)


def test_zstd_footers() -> None:
    blob_size = 1000
    v2 = build_zstd_footer(108, 300, 900, 416, 200, 700)
    assert len(v2) == 72 and v2[-8:] == b"GNUlInUx"
    location = parse_footer(v2, blob_size)
    assert location.format is LayerFormat.ZSTD_CHUNKED
    assert (location.toc_offset, location.toc_length, location.toc_uncompressed) == (108, 300, 900)
    assert (location.tarsplit_offset, location.tarsplit_length) == (416, 200)
    assert location.payload_end == 100
    legacy = build_zstd_legacy_footer(108, 300, 900)
    assert len(legacy) == 48 and legacy[-8:] == b"GnUlInUx"
    location = parse_footer(legacy, blob_size)
    assert location.format is LayerFormat.ZSTD_CHUNKED_LEGACY
    assert (location.toc_offset, location.toc_length) == (108, 300)


def test_tail_longer_than_blob() -> None:
    with pytest.raises(LayerFormatError, match="longer"):
        parse_footer(b"x" * 10, 5)


@fuzz_settings(200)
@given(
    prefix=st.binary(max_size=200),
    tail=st.one_of(
        st.binary(max_size=100),
        st.builds(build_estargz_footer, st.integers(0, 2**40)),
        st.builds(legacy_estargz_footer, st.integers(0, 2**40)),
        st.builds(build_zstd_footer, *[st.integers(0, 2**64 - 1) for _ in range(6)]),
        st.builds(build_zstd_legacy_footer, *[st.integers(0, 2**64 - 1) for _ in range(3)]),
    ),
    flip=st.integers(0, 120),
)
def test_fuzzed_footers_only_raise_format_errors(prefix: bytes, tail: bytes, flip: int) -> None:
    data = bytearray(prefix + tail)
    if data and flip < len(data):
        data[-1 - flip] ^= 0xA5
    try:
        location = parse_footer(bytes(data), len(data))
    except LayerFormatError:
        return
    assert 0 <= location.toc_offset < len(data)
    assert location.toc_offset + location.toc_length <= len(data)
    assert 0 <= location.payload_end <= location.toc_offset
