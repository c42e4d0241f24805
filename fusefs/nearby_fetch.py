"""Nearby fetch: read misses that land close together in a layer's blob fetch the small files
around them.

Files a program reads together were often installed together: a package's headers, a
compiler's startup objects, a library directory. In an image's layer they then lie near each
other in the blob, but not in blob order (a directory's files are not all in one place, and a
program reads them in its own order), so readahead, which follows forward walks, and directory
fetch, which needs several misses in one directory, miss them. The startup benchmark's gcc run
missed on eight C headers, one round trip each, all within 630 KB of the gcc layer.

So when a reader's miss lands within ``nearby_span`` of one of the layer's last few misses,
the chunks of small files around the two (``nearby_span`` / 2 on either side) that nobody has
fetched are requested at once, up to ``nearby_fetch_max`` compressed bytes, in ranges of
``ondemand_range`` so that a reader needing one of them waits for a short range only. Nobody
waits on them: they are claimed as background work, and a reader needing one of their chunks
fetches it itself if the range fails. Chunks of large files are left out (a large file read
whole has its own file completion), and so are zTOC layers, whose chunks are shares of spans.

Off unless ``nearby_span`` is set (the daemon's ``[lazy] nearby_fetch``): python's imports miss
close to each other too, and in the startup benchmark they fetched 3.4 MB more in 32 more
requests and took twice as long with it.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from fusefs.fetch_config import FetchConfig
from fusefs.flights import ChunkFlights
from fusefs.index import ChunkRef
from fusefs.inflated_spans import span_layer
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import group_chunks

log = logging.getLogger(__name__)

_RECENT = 4  # misses remembered per layer
_MAX_WINDOWS = 64  # windows remembered per layer as fetched; past this the list starts over
_SMALL_FILE_FACTOR = 2  # a chunk is of a small file when the file is at most this x ondemand_range


class NearbyFetch:
    """Watches one filesystem's read misses (``note_miss``) and fetches around close ones."""

    def __init__(self, flights: ChunkFlights, nursery: trio.Nursery, config: FetchConfig) -> None:
        self._flights = flights
        self._nursery = nursery
        self._config = config
        self._recent: dict[str, deque[int]] = {}
        self._fetched: dict[str, list[tuple[int, int]]] = {}  # windows fetched so far
        self.started = 0  # nearby fetches started, for tests and debugging

    def note_miss(self, layer: Layer, ref: ChunkRef) -> None:
        """A reader missed on ``ref``: if a recent miss of the layer was close, fetch around
        both (started, not awaited)."""
        span = self._config.nearby_span
        if span <= 0 or span_layer(layer.index) is not None:
            return
        offset = ref.blob_offset
        recent = self._recent.setdefault(layer.layer_id, deque(maxlen=_RECENT))
        near = [other for other in recent if abs(other - offset) <= span]
        recent.append(offset)
        if not near:
            return
        low = max(0, min(*near, offset) - span // 2)
        high = min(layer.blob.size, max(*near, offset) + span // 2)
        fetched = self._fetched.setdefault(layer.layer_id, [])
        if any(start <= offset < end for start, end in fetched):
            return  # this window's fetch covered the miss's place already (or failed there)
        if len(fetched) >= _MAX_WINDOWS:
            fetched.clear()
        fetched.append((low, high))
        self.started += 1
        self._nursery.start_soon(self._fetch_window, layer, low, high)

    async def _fetch_window(self, layer: Layer, low: int, high: int) -> None:
        try:
            chunks = self._small_missing(layer, low, high)
            for planned in group_chunks(
                chunks, max_range=self._config.ondemand_range, max_gap=self._config.max_gap
            ):
                claim = self._flights.claim(layer, planned, background=True)
                if claim:
                    self._nursery.start_soon(self._flights.fetch_claimed, layer, planned, claim)
            log.debug(
                "nearby fetch layer=%s start=%d end=%d chunks=%d",
                layer.layer_id,
                low,
                high,
                len(chunks),
            )
        except Exception as exc:  # background work: never tear anything down
            log.warning(
                "nearby fetch failed layer=%s digest=%s error=%r", layer.layer_id, layer.digest, exc
            )

    def _small_missing(
        self, layer: Layer, low: int, high: int
    ) -> list[tuple[ChunkTag, ChunkRef]]:
        """The missing chunks of small files within ``[low, high)``, nearest to the middle
        first until ``nearby_fetch_max``, returned in blob order."""
        small = _SMALL_FILE_FACTOR * self._config.ondemand_range
        found: list[tuple[ChunkTag, ChunkRef]] = []
        for entry in _files_within(layer, low, high):
            chunks = layer.index.chunks(entry)
            if not chunks or chunks[-1].blob_end - chunks[0].blob_offset > small:
                continue
            for number, ref in enumerate(chunks):
                if not ref.zeros and self._flights.is_missing(layer, ref):
                    found.append(((entry, number), ref))
        middle = (low + high) // 2
        found.sort(key=lambda chunk: abs(chunk[1].blob_offset - middle))
        chosen: list[tuple[ChunkTag, ChunkRef]] = []
        total = 0
        for tag, ref in found:
            size = ref.blob_end - ref.blob_offset
            if total + size > self._config.nearby_fetch_max:
                break
            total += size
            chosen.append((tag, ref))
        chosen.sort(key=lambda chunk: chunk[1].blob_offset)
        return chosen


def _files_within(layer: Layer, low: int, high: int) -> list[int]:
    """The files whose first chunk starts within ``[low, high)``, found by bisecting the
    layer's files in blob order."""
    sequence = layer.index.file_entries()

    def first_offset(position: int) -> int:
        chunks = layer.index.chunks(sequence[position])
        return chunks[0].blob_offset if chunks else -1

    # Files without chunks (empty) sit anywhere in blob order; bisect over those with chunks
    # by stepping past them.
    lo, hi = 0, len(sequence)
    while lo < hi:
        mid = (lo + hi) // 2
        probe = mid
        while probe < hi and first_offset(probe) < 0:
            probe += 1
        if probe < hi and first_offset(probe) < low:
            lo = probe + 1
        else:
            hi = mid
    files = []
    for position in range(lo, len(sequence)):
        offset = first_offset(position)
        if offset >= high:
            break
        if offset >= low:
            files.append(sequence[position])
    return files
