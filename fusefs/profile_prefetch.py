"""Prefetch a layer's files from a startup profile: what the image's earlier containers read
first, fetched in large parallel ranges as soon as the profile is known.

The profile comes from the registry and may be written by anyone allowed to push there, so it
only chooses what to fetch and in which order: paths are looked up in the layer's own index
(a path the layer does not have, or that is not a regular file, is skipped), fetches go through
``ChunkFlights`` like any read (single flight, every chunk verified against its digest), and
the bytes fetched are bounded by ``MAX_PROFILE_BYTES`` per layer. Ranges are claimed only when
they start, so a reader never waits behind a range that is merely queued; a reader needing a
chunk of a running range waits for it instead of fetching it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from fusefs.exec_prefetch import resolve_in
from fusefs.fetcher import ChunkFetcher
from fusefs.index import ChunkRef
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import PlannedRange, group_chunks
from fusefs.stats import PREFETCH, set_fetch_kind

log = logging.getLogger(__name__)

MAX_PROFILE_BYTES = 512 << 20  # uncompressed bytes of one layer's profiled files
RANGE_BYTES = 4 << 20  # compressed bytes per request
CONCURRENCY = 4  # requests at a time: enough to fill a long fat link, few enough to let
# readers' own misses in
_YIELD_EVERY = 64


async def plan(
    layer: Layer, files: Sequence[tuple[str, int]], *, max_gap: int
) -> list[PlannedRange[ChunkTag]]:
    """The ranges to fetch for ``files`` ((path, bytes read) in first-read order), the ranges
    needed earliest first; each range is in blob order and at most ``RANGE_BYTES`` long.
    Path lookups run on the trio thread: it yields to readers every ``_YIELD_EVERY`` files, as
    a profile may list thousands."""
    # (blob offset, inner offset) -> (rank, tag, ref): chunks of a zTOC span share an offset
    wanted: dict[tuple[int, int], tuple[int, ChunkTag, ChunkRef]] = {}
    budget = MAX_PROFILE_BYTES
    for rank, (path, read_bytes) in enumerate(files):
        if rank % _YIELD_EVERY == _YIELD_EVERY - 1:
            await trio.lowlevel.checkpoint()
        found = resolve_in([layer], path.encode("utf-8", "surrogateescape"))
        if found is None:
            continue
        entry = found[1]
        for number, ref in enumerate(layer.index.chunks(entry)):
            if ref.file_offset >= max(read_bytes, 1) or budget <= 0:
                break
            if ref.zeros:
                continue
            budget -= ref.size
            wanted.setdefault((ref.blob_offset, ref.inner_offset), (rank, (entry, number), ref))
    ordered = sorted(wanted.values(), key=lambda item: (item[2].blob_offset,
                                                       item[2].inner_offset))
    rank_at = {tag: rank for rank, tag, _ in ordered}
    ranges = list(group_chunks(((tag, ref) for _, tag, ref in ordered),
                               max_range=RANGE_BYTES, max_gap=max_gap))
    ranges.sort(key=lambda planned: min(rank_at[tag] for tag, _ in planned.chunks))
    return ranges


async def prefetch_profile(
    fetcher: ChunkFetcher, layer: Layer, files: Sequence[tuple[str, int]]
) -> None:
    """Fetch the profiled part of ``files``; failures are logged, readers fetch on their own."""
    set_fetch_kind(PREFETCH)
    started = trio.current_time()
    ranges = await plan(layer, files, max_gap=fetcher.config.max_gap)
    slots = trio.Semaphore(CONCURRENCY)
    fetched = 0
    async with trio.open_nursery() as nursery:
        for planned in ranges:
            await slots.acquire()
            missing = fetcher.flights.missing_part(layer, planned)  # readers went on meanwhile
            if missing is None:
                slots.release()
                continue
            fetched += missing.length
            nursery.start_soon(_fetch_then_release, fetcher, layer, missing, slots)
    log.info(
        "profile prefetch done layer=%s digest=%s files=%d ranges=%d bytes=%d seconds=%.3f",
        layer.layer_id, layer.digest, len(files), len(ranges), fetched,
        trio.current_time() - started,
        extra={"event": "profile_prefetched"},
    )


async def _fetch_then_release(
    fetcher: ChunkFetcher, layer: Layer, planned: PlannedRange[ChunkTag], slots: trio.Semaphore
) -> None:
    try:
        await fetcher.flights.fetch_background(layer, planned)
    except Exception as exc:  # a reader fetches what this range did not deliver
        log.warning("profile prefetch range failed layer=%s start=%d length=%d error=%r",
                    layer.layer_id, planned.start, planned.length, exc)
    finally:
        slots.release()
