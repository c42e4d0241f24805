from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusefs.index import ChunkRef
from fusefs.ranges import coalesce, split_blob


def ref(start: int, end: int, *, zeros: bool = False) -> ChunkRef:
    return ChunkRef(0, 1, start, end, 0, None, zeros)


def test_seed_only_when_nothing_follows() -> None:
    planned = coalesce([("a", ref(10, 20))], [], wanted=lambda r: True, max_range=100, max_gap=5)
    assert (planned.start, planned.end, [t for t, _ in planned.chunks]) == (10, 20, ["a"])


def test_adjacent_small_chunks_join_until_the_cap() -> None:
    following = [(f"f{i}", ref(20 + 10 * i, 30 + 10 * i)) for i in range(20)]
    planned = coalesce(
        [("seed", ref(10, 20))], following, wanted=lambda r: True, max_range=55, max_gap=0
    )
    assert planned.start == 10 and planned.end == 60
    assert [t for t, _ in planned.chunks] == ["seed", "f0", "f1", "f2", "f3"]


def test_unwanted_chunks_are_skipped_but_count_as_gap() -> None:
    following = [("cached", ref(20, 30)), ("next", ref(30, 40)), ("far", ref(60, 70))]
    wanted = {"next", "far"}
    planned = coalesce(
        [("seed", ref(10, 20))],
        following,
        wanted=lambda r: any(t in wanted for t, c in following if c == r),
        max_range=1000,
        max_gap=10,
    )
    # "next" is 10 bytes past the seed (the cached chunk): within the gap; "far" is 20 past.
    assert [t for t, _ in planned.chunks] == ["seed", "next"]
    assert planned.end == 40


def test_zeros_chunks_are_never_fetched_and_out_of_order_stops() -> None:
    following = [("z", ref(0, 0, zeros=True)), ("b", ref(20, 30)), ("back", ref(5, 8))]
    planned = coalesce(
        [("seed", ref(10, 20))], following, wanted=lambda r: True, max_range=100, max_gap=0
    )
    assert [t for t, _ in planned.chunks] == ["seed", "b"]


def test_large_seed_is_fetched_whole() -> None:
    planned = coalesce(
        [("big", ref(0, 1000))],
        [("n", ref(1000, 1010))],
        wanted=lambda r: True,
        max_range=100,
        max_gap=0,
    )
    assert (planned.start, planned.end, len(planned.chunks)) == (0, 1000, 1)


def test_coalesce_needs_a_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        coalesce([], [], wanted=lambda r: True, max_range=1, max_gap=0)


@st.composite
def blobs(draw: st.DrawFn) -> tuple[list[tuple[int, ChunkRef]], int, int, int | None]:
    sizes = draw(st.lists(st.integers(1, 50), max_size=40))
    gaps = draw(st.lists(st.integers(0, 10), min_size=len(sizes), max_size=len(sizes)))
    chunks: list[tuple[int, ChunkRef]] = []
    offset = draw(st.integers(0, 10))
    for i, (size, gap) in enumerate(zip(sizes, gaps, strict=True)):
        chunks.append((i, ref(offset, offset + size)))
        offset += size + gap
    blob_size = offset + draw(st.integers(0, 30))
    range_size = draw(st.integers(1, 200))
    boundaries = [0] + [c.blob_offset for _, c in chunks]
    first_cut = draw(st.none() | st.sampled_from(boundaries))
    return chunks, blob_size, range_size, first_cut


@given(blobs())
def test_split_blob_covers_every_byte_once_with_whole_chunks(
    case: tuple[list[tuple[int, ChunkRef]], int, int, int | None],
) -> None:
    chunks, blob_size, range_size, first_cut = case
    ranges = list(
        split_blob(chunks, blob_size=blob_size, range_size=range_size, first_cut=first_cut)
    )
    position = 0
    seen: list[int] = []
    for planned in ranges:
        assert planned.start == position and planned.end > planned.start
        position = planned.end
        for tag, c in planned.chunks:
            assert planned.start <= c.blob_offset and c.blob_end <= planned.end
            seen.append(tag)
    assert position == max(blob_size, 1) or (blob_size == 0 and not ranges)
    assert seen == [tag for tag, _ in chunks]
    if first_cut:
        assert ranges[0].end == first_cut


def test_split_blob_ranges_have_about_the_asked_size() -> None:
    chunks = [(i, ref(i * 10, i * 10 + 10)) for i in range(100)]
    ranges = list(split_blob(chunks, blob_size=1000, range_size=100, first_cut=35 * 10))
    assert [r.length for r in ranges] == [350] + [100] * 6 + [50]


def test_split_blob_rejects_bad_range_size() -> None:
    with pytest.raises(ValueError, match="range_size"):
        list(split_blob([], blob_size=10, range_size=0))


def test_split_blob_hands_the_chunks_no_range_carries_to_left_out() -> None:
    chunks = [(0, ref(0, 10)), (1, ref(200, 210)), (2, ref(50, 60)), (3, ref(210, 220))]
    left_out: list[tuple[int, ChunkRef]] = []
    ranges = list(split_blob(chunks, blob_size=300, range_size=100, left_out=left_out))
    assert [tag for planned in ranges for tag, _ in planned.chunks] == [0, 1, 3]
    assert left_out == [chunks[2]]  # out of blob order: behind the cut at 200
