"""Fuzzing the footers and the manifest-position annotation: only LayerFormatError escapes,
and what the writers build parses back to the same TOC location."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fusefs.formats import LayerFormat, LayerFormatError, parse_footer
from fusefs.formats import annotations as keys
from fusefs.formats.footer import (
    MAX_FOOTER_SIZE,
    build_estargz_footer,
    build_zstd_footer,
    build_zstd_legacy_footer,
)
from fusefs.formats.layer import location_from_annotations
from tests.fusefs.formats_support import legacy_estargz_footer
from tests.fuzzing import fuzz_settings

U64 = 2**64 - 1
# Offsets near the edges the parsers check: zero, the frame header, the blob's end, 2**64.
edges = st.one_of(
    st.integers(0, 16), st.integers(0, 5000), st.integers(U64 - 16, U64), st.integers(0, U64)
)
footers = st.one_of(
    st.builds(build_estargz_footer, st.integers(0, 2**64 - 1)),
    st.builds(legacy_estargz_footer, st.integers(0, 2**40)),
    st.builds(build_zstd_footer, *[edges] * 6),
    st.builds(build_zstd_legacy_footer, *[edges] * 3),
)
flips = st.lists(st.tuples(st.integers(1, MAX_FOOTER_SIZE), st.integers(0, 255)), max_size=3)


@fuzz_settings(300)
@given(footer=footers, flips=flips, extra=st.integers(0, 10_000), cut=st.integers(0, 80))
def test_mutated_footers_only_raise_format_errors(
    footer: bytes, flips: list[tuple[int, int]], extra: int, cut: int
) -> None:
    tail = bytearray(footer)
    for back, mask in flips:
        tail[-min(back, len(tail))] ^= mask
    tail = tail[min(cut, len(tail)) :] if cut > 70 else tail
    blob_size = len(tail) + extra
    try:
        location = parse_footer(bytes(tail), blob_size)
    except LayerFormatError:
        return
    assert 0 <= location.toc_offset < blob_size - location.footer_size
    assert 0 < location.toc_length <= blob_size - location.footer_size - location.toc_offset
    assert location.payload_end <= location.toc_offset


@fuzz_settings(300)
@given(
    offset=st.integers(8, 2**40),
    length=st.integers(1, 2**40),
    raw=st.integers(0, U64),
    gap=st.integers(0, 2**20),
    tarsplit=st.integers(1, 2**30),
)
def test_zstd_footers_round_trip(
    offset: int, length: int, raw: int, gap: int, tarsplit: int
) -> None:
    ts_off = offset + length + gap
    blob_size = ts_off + tarsplit + 72
    location = parse_footer(
        build_zstd_footer(offset, length, raw, ts_off, tarsplit, raw), blob_size
    )
    assert location.format is LayerFormat.ZSTD_CHUNKED
    assert (location.toc_offset, location.toc_length, location.toc_uncompressed) == (
        offset, length, raw)  # fmt: skip
    assert (location.tarsplit_offset, location.tarsplit_length) == (ts_off, tarsplit)
    legacy = parse_footer(build_zstd_legacy_footer(offset, length, raw), offset + length + 48)
    assert legacy.format is LayerFormat.ZSTD_CHUNKED_LEGACY
    assert (legacy.toc_offset, legacy.toc_length, legacy.toc_uncompressed) == (offset, length, raw)


@fuzz_settings(300)
@given(offset=st.integers(0, 2**60), length=st.integers(1, 2**30))
def test_estargz_footer_round_trips(offset: int, length: int) -> None:
    blob_size = offset + length + 51
    location = parse_footer(build_estargz_footer(offset), blob_size)
    assert location.format is LayerFormat.ESTARGZ
    assert (location.toc_offset, location.toc_length) == (offset, length)


fields = st.one_of(
    st.integers(0, 2**64 + 5).map(str),
    st.sampled_from(["", "-1", "+1", " 1", "1 ", "0x10", "1_0", "\uff11", "\u0661", "00", "1e3"]),
    st.text(alphabet="0123456789:", max_size=25),
)
positions = st.one_of(
    st.lists(fields, min_size=1, max_size=6).map(":".join),
    st.tuples(fields, fields, fields).map(lambda f: ":".join((*f, "1"))),
    st.text(max_size=40),
)
position_keys = st.sampled_from(
    [keys.ZSTD_MANIFEST_POSITION, keys.LEGACY_ZSTD_MANIFEST_POSITION, keys.ZSTD_TARSPLIT_POSITION]
)


@fuzz_settings(300)
@given(
    annotations=st.dictionaries(position_keys, positions, max_size=3),
    blob_size=st.one_of(st.integers(0, 10_000), st.integers(0, 2**64)),
)
def test_manifest_position_annotations_only_raise_format_errors(
    annotations: dict[str, str], blob_size: int
) -> None:
    try:
        location = location_from_annotations(annotations, blob_size)
    except LayerFormatError:
        return
    if location is None:
        assert not {keys.ZSTD_MANIFEST_POSITION, keys.LEGACY_ZSTD_MANIFEST_POSITION} & set(
            annotations
        )
        return
    assert location.toc_offset >= 8
    assert 0 < location.toc_length <= blob_size - location.toc_offset


@fuzz_settings(300)
@given(offset=st.integers(0, 10**19 - 1), length=st.integers(1, 10**19 - 1),
       raw=st.integers(0, 10**19 - 1))  # fmt: skip
def test_manifest_position_round_trips(offset: int, length: int, raw: int) -> None:
    parsed = keys.parse_manifest_position(f"{offset}:{length}:{raw}:1")
    assert parsed == keys.ManifestPosition(offset, length, raw)
