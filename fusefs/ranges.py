"""Pure range planning: which compressed bytes to ask the blob for, in how many requests.

Round trips dominate a lazy start, so a miss never fetches just its own chunk: the planner grows
the request over the following chunks of the file and then over the next files in blob order,
up to a size cap and across only small gaps of bytes nobody asked for. TOC order is tar order,
so a directory's small files sit together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from fusefs.index import ChunkRef

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PlannedRange(Generic[T]):
    """One blob request ``[start, end)`` and the chunks it decodes, with their caller's tags."""

    start: int
    end: int
    chunks: tuple[tuple[T, ChunkRef], ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def coalesce(
    seed: Sequence[tuple[T, ChunkRef]],
    following: Iterable[tuple[T, ChunkRef]],
    *,
    wanted: Callable[[ChunkRef], bool],
    max_range: int,
    max_gap: int,
) -> PlannedRange[T]:
    """Extend the range covering ``seed`` over the ``following`` chunks, in blob order.

    ``seed`` chunks are always included, whatever their size. A following chunk joins while the
    range stays within ``max_range`` bytes and the bytes skipped before it stay within
    ``max_gap``. Skipped bytes are chunks that are not ``wanted``, e.g. already cached, plus
    anything between chunks. Planning stops at the first chunk that does not fit or that lies
    before the range, as in a TOC whose blob order is not monotonic. So the cost is bounded by
    what the range can hold.
    """
    if not seed:
        raise ValueError("coalesce needs at least one seed chunk")
    start = min(ref.blob_offset for _, ref in seed)
    end = max(ref.blob_end for _, ref in seed)
    chunks = list(seed)
    for tag, ref in following:
        if ref.zeros:
            continue  # nothing to fetch
        if ref.blob_offset < start or ref.blob_offset > end + max_gap:
            break
        new_end = max(end, ref.blob_end)
        if new_end - start > max_range:
            break
        if not wanted(ref):
            continue
        end = new_end
        chunks.append((tag, ref))
    return PlannedRange(start, end, tuple(chunks))


def split_blob(
    chunks: Iterable[tuple[T, ChunkRef]],
    *,
    blob_size: int,
    range_size: int,
    first_cut: int | None = None,
    left_out: list[tuple[T, ChunkRef]] | None = None,
) -> Iterator[PlannedRange[T]]:
    """Cover the whole blob ``[0, blob_size)`` with consecutive ranges of about ``range_size``.

    Cuts fall only at chunk boundaries, never inside bytes a chunk needs, and gzip members shared
    through innerOffset count as needed. So every chunk lies entirely inside one range.
    ``first_cut`` is the prefetch landmark's offset: it makes ``[0, first_cut)`` a range of its
    own, whatever its size. The last range runs to the end of the blob, TOC and footer included,
    so the ranges' bytes hashed in order give the blob digest. Chunks are consumed lazily.
    ``left_out``, when given, gets the chunks no range carries (straddling a cut, or out of
    blob order), so a caller walking the chunks once still knows all of them.
    """
    if range_size <= 0:
        raise ValueError("range_size must be positive")
    cut = first_cut if first_cut is not None and 0 < first_cut < blob_size else None
    start = 0
    covered = 0  # one past the last byte any chunk of the current range needs
    pending: list[tuple[T, ChunkRef]] = []
    for tag, ref in chunks:
        if ref.zeros:
            continue
        if cut is not None and ref.blob_end > cut:
            # Everything before the landmark is one request, however large.
            yield PlannedRange(start, cut, tuple(pending))
            pending = []
            start = covered = cut
            cut = None
        elif cut is None and ref.blob_offset >= covered and ref.blob_offset - start >= range_size:
            yield PlannedRange(start, ref.blob_offset, tuple(pending))
            pending = []
            start = ref.blob_offset
        if ref.blob_offset < start:
            # Straddles a cut or out of blob order: left to on-demand reads.
            if left_out is not None:
                left_out.append((tag, ref))
            continue
        pending.append((tag, ref))
        covered = max(covered, ref.blob_end)
    if cut is not None:
        yield PlannedRange(start, cut, tuple(pending))
        pending = []
        start = covered = cut
    end = max(blob_size, covered)
    if start < end:
        yield PlannedRange(start, end, tuple(pending))


def group_chunks(
    chunks: Iterable[tuple[T, ChunkRef]], *, max_range: int, max_gap: int
) -> Iterator[PlannedRange[T]]:
    """Requests for ``chunks``, given in blob order and none ``zeros``. Consecutive chunks share one
    while it stays within ``max_range`` bytes and the gaps between them within ``max_gap``."""
    group: list[tuple[T, ChunkRef]] = []
    start = end = 0
    for tag, ref in chunks:
        if group and (
            ref.blob_offset < start
            or ref.blob_offset > end + max_gap
            or max(end, ref.blob_end) - start > max_range
        ):
            yield PlannedRange(start, end, tuple(group))
            group = []
        if not group:
            start = end = ref.blob_offset
        group.append((tag, ref))
        end = max(end, ref.blob_end)
    if group:
        yield PlannedRange(start, end, tuple(group))
