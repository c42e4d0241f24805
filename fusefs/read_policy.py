"""What a read miss fetches besides the chunk it needs, and what is fetched ahead of readers.

* A miss is coalesced with the missing chunks after it into one range of ``ondemand_range``.
* Readahead: while misses walk forward through the blob, each range is twice as large as the
  last, and the next one is requested before the reader gets there.
* Directory fetch: the ``directory_misses``-th miss in one directory fetches its other files.
* File completion: the first read of a file fetches the rest of it, as most files are read whole.
* Nearby fetch: a miss close to a recent one fetches the small files around them
  (``fusefs.nearby_fetch``).

Nobody waits on the ranges fetched ahead. They are claimed as background work, so a reader
waiting on one of their chunks fetches it itself if the range fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from fusefs.fetch_config import FetchConfig
from fusefs.flights import ChunkFlights, Claim
from fusefs.index import ChunkRef
from fusefs.layer import ChunkTag, Layer
from fusefs.nearby_fetch import NearbyFetch
from fusefs.ranges import PlannedRange, coalesce, group_chunks

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Readahead:
    """Where a layer's reader missed last, to tell a forward walk through the blob."""

    end: int  # one past the last byte requested for that miss or ahead of it
    window: int  # the size that range was planned with
    last: ChunkTag  # its last chunk: the next range ahead starts after it
    last_offset: int  # that chunk's blob offset: a miss before it is no forward walk
    marker: int = -1  # a read from here to ``end`` requests the next range ahead


class ReadPolicy:
    def __init__(self, flights: ChunkFlights, nursery: trio.Nursery, config: FetchConfig) -> None:
        self._flights = flights
        self._nursery = nursery
        self._config = config
        self._completion_slots = trio.Semaphore(config.file_completion_concurrency)
        self._readahead: dict[str, _Readahead] = {}
        self._directory_misses: dict[tuple[str, int], int] = {}
        self.nearby = NearbyFetch(flights, nursery, config)

    # -- the read path ---------------------------------------------------------------------------

    def before_read(self, layer: Layer, ref: ChunkRef) -> None:
        """A read starts at ``ref``: if it reached the range requested ahead of the reader,
        request the next, larger one."""
        ahead = self._readahead.get(layer.layer_id)
        if ahead is not None and 0 <= ahead.marker <= ref.blob_offset < ahead.end:
            ahead.marker = -1
            ahead.window = min(2 * ahead.window, self._readahead_cap())
            self._start_ahead(layer, ahead)

    def after_first_read(self, layer: Layer, entry: int, first: int, after: int) -> None:
        """The first read of ``entry`` covered its chunks ``first`` to ``after - 1``: fetch the
        rest of the file without making the reader wait for it."""
        if after < len(layer.index.chunks(entry)):
            self._nursery.start_soon(self._complete_file, layer, entry, first)

    async def fetch_miss(
        self, layer: Layer, entry: int, chunks: Sequence[ChunkRef], number: int, claim: Claim
    ) -> None:
        """Fetch the range around a read miss at chunk ``number`` of ``entry``, which ``claim``
        holds."""
        ref = chunks[number]
        window = self._miss_window(layer, ref)
        planned = coalesce(
            [((entry, number), ref)],
            layer.chunks_after(entry, number),
            wanted=lambda candidate: self._flights.is_missing(layer, candidate),
            max_range=window,
            max_gap=self._config.max_gap,
        )
        self._after_miss(layer, planned, window)
        self._note_directory_miss(layer, entry)
        await self._flights.fetch_range(layer, planned, seed=claim)
        if window == self._config.ondemand_range:  # a forward walk has readahead instead
            # Once this miss's own range is in: started with it, the nearby ranges shared the
            # link with it (a header's wait went from 0.1 to 0.2 s in the gcc benchmark).
            self.nearby.note_miss(layer, ref)

    # -- readahead -------------------------------------------------------------------------------

    def _miss_window(self, layer: Layer, ref: ChunkRef) -> int:
        """The range size for a miss at ``ref``: doubled while misses continue where the last
        range ended, ``ondemand_range`` for a miss anywhere else.

        Forward only: a miss a little before the last range (a reader going backward through a
        directory) is no walk, and a doubled range plus readahead from there would fetch bytes
        nobody asks for. A miss at the last chunk's own blob offset is no walk either: in a zTOC
        layer every chunk of a span has the span's offset, and a doubled range from a file
        earlier in that span would reach into the next span and inflate this one again."""
        base = self._config.ondemand_range
        ahead = self._readahead.get(layer.layer_id)
        if ahead is None or not (
            ahead.last_offset < ref.blob_offset <= ahead.end + self._config.max_gap
        ):
            return base
        return min(max(2 * ahead.window, base), self._readahead_cap())

    def _readahead_cap(self) -> int:
        return max(self._config.readahead_max_range, self._config.ondemand_range)

    def _after_miss(self, layer: Layer, planned: PlannedRange[ChunkTag], window: int) -> None:
        last_tag, last_ref = planned.chunks[-1]
        ahead = _Readahead(
            end=planned.end, window=window, last=last_tag, last_offset=last_ref.blob_offset
        )
        self._readahead[layer.layer_id] = ahead
        if window > self._config.ondemand_range:
            # The second forward miss in a row is a walk through the blob. Request the next
            # range now, so the reader finds it in flight or cached instead of missing again.
            self._start_ahead(layer, ahead)

    def _start_ahead(self, layer: Layer, ahead: _Readahead) -> None:
        """Request the ``ahead.window`` bytes after ``ahead.last`` that are not yet cached."""
        following = layer.chunks_after(*ahead.last)
        seed: tuple[ChunkTag, ChunkRef] | None = None
        for tag, ref in following:
            if ref.blob_offset > ahead.end + ahead.window:
                break  # all cached for a whole window: let the next miss decide
            if not ref.zeros and self._flights.is_missing(layer, ref):
                seed = (tag, ref)
                break
        if seed is None:
            return
        planned = coalesce(
            [seed],
            following,
            wanted=lambda candidate: self._flights.is_missing(layer, candidate),
            max_range=ahead.window,
            max_gap=self._config.max_gap,
        )
        claim = self._flights.claim(layer, planned, background=True)
        ahead.end = planned.end
        ahead.last, last_ref = planned.chunks[-1]
        ahead.last_offset = last_ref.blob_offset
        ahead.marker = planned.start
        self._nursery.start_soon(self._flights.fetch_claimed, layer, planned, claim)

    # -- directories -----------------------------------------------------------------------------

    def _note_directory_miss(self, layer: Layer, entry: int) -> None:
        """Count misses per directory; the ``directory_misses``-th one fetches the rest of it."""
        key = (layer.layer_id, layer.index.parent(entry))
        count = self._directory_misses.get(key, 0) + 1
        self._directory_misses[key] = count
        if count == self._config.directory_misses:
            self._nursery.start_soon(self._fetch_directory, layer, key[1])

    async def _fetch_directory(self, layer: Layer, directory: int) -> None:
        """Fetch the missing chunks of the files directly in ``directory`` if they come to at
        most ``directory_fetch_max`` compressed bytes."""
        try:
            missing: list[tuple[ChunkTag, ChunkRef]] = []
            total = 0
            for _, child in layer.index.children(directory):
                for number, ref in enumerate(layer.index.chunks(child)):
                    if ref.zeros or not self._flights.is_missing(layer, ref):
                        continue
                    total += ref.blob_end - ref.blob_offset
                    if total > self._config.directory_fetch_max:
                        return  # a directory of big files: its misses stay on demand
                    missing.append(((child, number), ref))
            missing.sort(key=lambda chunk: chunk[1].blob_offset)
            async with trio.open_nursery() as nursery:
                for planned in group_chunks(
                    missing,
                    max_range=self._config.file_completion_range,
                    max_gap=self._config.max_gap,
                ):
                    await self._completion_slots.acquire()
                    claim = self._flights.claim(layer, planned, background=True)
                    nursery.start_soon(self._fetch_released, layer, planned, claim)
            log.debug(
                "directory fetched layer=%s directory=%d chunks=%d bytes=%d",
                layer.layer_id,
                directory,
                len(missing),
                total,
            )
        except Exception as exc:  # background work: never tear anything down
            log.warning(
                "directory fetch failed layer=%s digest=%s directory=%d error=%r",
                layer.layer_id,
                layer.digest,
                directory,
                exc,
            )

    # -- file completion -------------------------------------------------------------------------

    async def _complete_file(self, layer: Layer, entry: int, start_number: int) -> None:
        """Fetch the remaining chunks of a file after its first read, a few ranges at a time."""
        try:
            chunks = layer.index.chunks(entry)
            window_end = chunks[start_number].blob_offset + self._config.file_completion_window
            number = start_number
            async with trio.open_nursery() as nursery:
                while number < len(chunks) and chunks[number].blob_offset < window_end:
                    # A slot first, then the plan: what readers fetched meanwhile drops out.
                    await self._completion_slots.acquire()
                    while number < len(chunks) and (
                        chunks[number].zeros or not self._flights.is_missing(layer, chunks[number])
                    ):
                        number += 1
                    if number >= len(chunks) or chunks[number].blob_offset >= window_end:
                        self._completion_slots.release()
                        break
                    # This file's chunks only. The neighbours are a guess, and a large guess in
                    # flight is link time that the reader's next miss, often in another
                    # directory, waits for. Readahead and directory fetch cover those walks.
                    planned = coalesce(
                        [((entry, number), chunks[number])],
                        (((entry, k), chunks[k]) for k in range(number + 1, len(chunks))),
                        wanted=lambda candidate: self._flights.is_missing(layer, candidate),
                        max_range=self._config.file_completion_range,
                        max_gap=self._config.max_gap,
                    )
                    # Claimed now, so that the next planning round skips these chunks.
                    claim = self._flights.claim(layer, planned)
                    nursery.start_soon(self._fetch_released, layer, planned, claim)
                    number = max(number + 1, _next_number(planned, entry, number))
        except Exception as exc:  # background work: never tear anything down
            log.warning(
                "file completion failed layer=%s digest=%s entry=%d error=%r",
                layer.layer_id,
                layer.digest,
                entry,
                exc,
            )

    async def _fetch_released(
        self, layer: Layer, planned: PlannedRange[ChunkTag], claim: Claim
    ) -> None:
        try:
            await self._flights.fetch_claimed(layer, planned, claim)
        finally:
            self._completion_slots.release()


def _next_number(planned: PlannedRange[ChunkTag], entry: int, number: int) -> int:
    """The chunk of ``entry`` after the last one the range covers."""
    last = number
    for (tag_entry, tag_number), _ in planned.chunks:
        if tag_entry == entry:
            last = max(last, tag_number)
    return last + 1
