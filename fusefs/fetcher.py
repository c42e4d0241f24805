"""Chunk reads: the cache first, else one coalesced range request shared by every reader.

Single flight: each missing chunk (by cache key, so across layers too) has at most one fetch in
progress; concurrent readers wait for it. Fetches run in the fetcher's own nursery, so a reader
that goes away does not abort a fetch others are waiting on.

Priority: a reader waiting on a chunk that is not in memory marks itself foreground; background
work calls ``wait_for_idle`` before each new request, so it yields to readers without a fixed
quiet time. Background ranges claim their chunks before requesting them, so a reader that needs
one of them waits for that range instead of fetching the same bytes again; the ranges are small
enough (2 MiB) that such a wait is short and the link is never hogged for long.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from fusefs.cache import ChunkCache, chunk_key
from fusefs.formats import decode_chunk
from fusefs.index import ChunkRef, Codec
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import PlannedRange, coalesce

log = logging.getLogger(__name__)

Decoder = Callable[[Codec, bytes, ChunkRef], bytes]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Tuning of the read path; the defaults suit a registry 1-50 ms away."""

    # A read miss waits for its whole range: 512 KiB is 2 round trips' worth at 100 Mbit/s and
    # 20 ms, so the reader gets its bytes soon while neighbouring small files still ride along
    # (startup benchmark: imports 7.7 s with 1 MiB, 6.7 s with 512 KiB).
    ondemand_range: int = 512 * 1024  # largest coalesced request for a read miss
    max_gap: int = 256 * 1024  # unrequested bytes a range may carry to join two chunks
    file_completion_window: int = 64 * MiB  # how much of a file its first read fetches ahead
    file_completion_range: int = 4 * MiB  # nobody waits on these: larger ranges, fewer trips
    file_completion_concurrency: int = 2
    background_range: int = 2 * MiB
    background_concurrency: int = 4
    # After a reader last waited on the link, background fetch keeps at most one range in
    # flight for this long: a program starting up reads file after file with short pauses,
    # and each new miss should not queue behind several background ranges.
    busy_window: float = 1.0
    hot_bytes: int = 32 * MiB  # decoded chunks kept in memory (a read is often < a chunk)


class FetchError(Exception):
    """A chunk could not be fetched, decoded or verified; readers get EIO."""


class _Flight:
    __slots__ = ("background", "data", "done", "error")

    def __init__(self, *, background: bool = False) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.background = background  # claimed by background fetch: a failure is retried


class _HotChunks:
    """A small LRU of decoded chunks: consecutive reads inside one chunk decode it once."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self._budget or key in self._items:
            return
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self._budget:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


class ChunkFetcher:
    """Serves chunk bytes to the read path, prefetch and background fetch."""

    def __init__(
        self,
        cache: ChunkCache,
        nursery: trio.Nursery,
        config: FetchConfig | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        self._cache = cache
        self._nursery = nursery
        self.config = config or FetchConfig()
        self._decode = decoder or decode_chunk
        self._inflight: dict[str, _Flight] = {}
        self._hot = _HotChunks(self.config.hot_bytes)
        self._foreground = 0
        self._idle = trio.Event()
        self._idle.set()
        self._last_foreground = -float("inf")
        self._completion_slots = trio.Semaphore(self.config.file_completion_concurrency)

    @property
    def cache(self) -> ChunkCache:
        return self._cache

    # -- priority ----------------------------------------------------------------------------

    @contextmanager
    def foreground(self) -> Iterator[None]:
        if self._foreground == 0:
            self._idle = trio.Event()
        self._foreground += 1
        try:
            yield
        finally:
            self._foreground -= 1
            if self._foreground == 0:
                self._last_foreground = trio.current_time()
                self._idle.set()

    async def wait_for_idle(self) -> None:
        while self._foreground:
            await self._idle.wait()

    def recently_busy(self) -> bool:
        """A reader is waiting, or waited within ``busy_window`` seconds."""
        if self._foreground:
            return True
        return trio.current_time() - self._last_foreground < self.config.busy_window

    # -- the read path -----------------------------------------------------------------------

    async def read(self, layer: Layer, entry: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of a regular file, short at end of file."""
        file_size = layer.index.attr(entry).size
        end = min(file_size, offset + size)
        if offset >= end:
            return b""
        chunks = layer.index.chunks(entry)
        number = layer.chunk_at(chunks, offset)
        first_number = number
        parts: list[memoryview] = []
        position = offset
        while position < end:
            if number >= len(chunks):
                raise FetchError(f"chunks of entry {entry} end before its size {file_size}")
            ref = chunks[number]
            data = await self.chunk(layer, entry, chunks, number)
            if len(data) != ref.size:
                raise FetchError(f"chunk {number} of entry {entry} decoded to a wrong size")
            lo = position - ref.file_offset
            hi = min(ref.size, end - ref.file_offset)
            parts.append(memoryview(data)[lo:hi])
            position = ref.file_offset + hi
            number += 1
        if layer.mark_read(entry) and number < len(chunks):
            # First read of a file: fetch the rest of it (most files are read whole) without
            # making this reader wait for it.
            self._nursery.start_soon(self._complete_file, layer, entry, first_number)
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    async def chunk(
        self, layer: Layer, entry: int, chunks: Sequence[ChunkRef], number: int
    ) -> bytes:
        """One chunk's verified bytes, from memory, the disk cache, or a (shared) fetch."""
        ref = chunks[number]
        if ref.zeros:
            return bytes(ref.size)
        key = chunk_key(ref, layer.digest)
        data = self._hot.get(key)
        if data is not None:
            return data
        # Only a reader that really waits counts as foreground: hits in memory must not pause
        # background fetch (a read-everything workload would starve it).
        with self.foreground():
            flight = await self._wait(layer, entry, number, ref, key)
            if flight.error is not None and flight.background:
                # A failed background range is not the reader's failure: try once on its own.
                flight = await self._wait(layer, entry, number, ref, key)
        if flight.error is not None:
            raise FetchError(str(flight.error)) from flight.error
        assert flight.data is not None
        return flight.data

    async def _wait(
        self, layer: Layer, entry: int, number: int, ref: ChunkRef, key: str
    ) -> _Flight:
        flight = self._inflight.get(key)
        if flight is None:
            flight = _Flight()
            self._inflight[key] = flight
            self._nursery.start_soon(self._load_or_fetch, layer, entry, number, ref, key, flight)
        await flight.done.wait()
        return flight

    async def _load_or_fetch(
        self, layer: Layer, entry: int, number: int, ref: ChunkRef, key: str, flight: _Flight
    ) -> None:
        # Runs in the fetcher's nursery: any exception must end up in the flight, not escape.
        try:
            data = await self._cache.load(key, ref.digest)
            if data is not None:
                self._resolve(key, flight, data, None)
                return
            planned = coalesce(
                [((entry, number), ref)],
                layer.chunks_after(entry, number),
                wanted=lambda candidate: self._is_missing(layer, candidate),
                max_range=self.config.ondemand_range,
                max_gap=self.config.max_gap,
            )
            await self.fetch_range(layer, planned, seed_flights={key: flight})
        except Exception as exc:
            self._resolve(key, flight, None, exc)
        finally:
            if not flight.done.is_set():  # cancelled at shutdown: release the waiters
                self._resolve(key, flight, None, FetchError("filesystem shutting down"))

    def _is_missing(self, layer: Layer, ref: ChunkRef) -> bool:
        key = chunk_key(ref, layer.digest)
        return key not in self._inflight and key not in self._cache and key not in self._hot

    async def _complete_file(self, layer: Layer, entry: int, start_number: int) -> None:
        """Fetch the remaining chunks of a file after its first read, a few ranges at a time."""
        try:
            chunks = layer.index.chunks(entry)
            window_end = chunks[start_number].blob_offset + self.config.file_completion_window
            number = start_number
            async with trio.open_nursery() as nursery:
                while number < len(chunks) and chunks[number].blob_offset < window_end:
                    ref = chunks[number]
                    if ref.zeros or not self._is_missing(layer, ref):
                        number += 1
                        continue
                    planned = coalesce(
                        [((entry, number), ref)],
                        layer.chunks_after(entry, number),
                        wanted=lambda candidate: self._is_missing(layer, candidate),
                        max_range=self.config.file_completion_range,
                        max_gap=self.config.max_gap,
                    )
                    await self._completion_slots.acquire()
                    # Register the flights now so the next planning round skips these chunks.
                    flights = self._claim(layer, planned)
                    nursery.start_soon(self._fetch_released, layer, planned, flights)
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
        self, layer: Layer, planned: PlannedRange[ChunkTag], flights: dict[str, _Flight]
    ) -> None:
        try:
            await self.fetch_range(layer, planned, seed_flights=flights, claimed=True)
        finally:
            self._completion_slots.release()

    # -- ranges ------------------------------------------------------------------------------

    def _claim(
        self, layer: Layer, planned: PlannedRange[ChunkTag], *, background: bool = False
    ) -> dict[str, _Flight]:
        flights: dict[str, _Flight] = {}
        for _, ref in planned.chunks:
            key = chunk_key(ref, layer.digest)
            if key in flights or key in self._inflight:
                continue
            flight = _Flight(background=background)
            self._inflight[key] = flight
            flights[key] = flight
        return flights

    def claim_background(
        self, layer: Layer, planned: PlannedRange[ChunkTag]
    ) -> dict[str, _Flight]:
        """Claim a background range's missing chunks before requesting it, so that readers
        wait for it rather than fetch the same bytes again."""
        missing = PlannedRange(
            planned.start,
            planned.end,
            tuple(c for c in planned.chunks if self._is_missing(layer, c[1]) and not c[1].zeros),
        )
        return self._claim(layer, missing, background=True)

    def fail(self, flights: dict[str, _Flight], error: BaseException) -> None:
        for key, flight in flights.items():
            self._resolve(key, flight, None, error)

    async def fetch_range(
        self,
        layer: Layer,
        planned: PlannedRange[ChunkTag],
        *,
        seed_flights: dict[str, _Flight] | None = None,
        claimed: bool = False,
        raw: bytes | None = None,
    ) -> bytes | None:
        """Fetch ``planned`` (or use ``raw``, its bytes) and fill the cache with its chunks.

        Chunks already cached or in flight elsewhere are skipped. Returns the raw range bytes
        (background fetch hashes them), or None when the request failed; the failure is
        delivered to every reader waiting on one of the range's chunks.
        """
        flights = dict(seed_flights or {})
        if not claimed:
            for key, flight in self._claim(layer, planned).items():
                flights.setdefault(key, flight)
        todo = [
            (key, ref)
            for key, ref in {chunk_key(r, layer.digest): r for _, r in planned.chunks}.items()
            if key in flights
        ]
        try:
            if raw is None:
                raw = await layer.blob.read_at(planned.start, planned.length)
                layer.stats.requests += 1
                layer.stats.fetched_bytes += len(raw)
                if len(raw) != planned.length:
                    raise FetchError(
                        f"blob returned {len(raw)} bytes for a {planned.length}-byte range"
                    )
            outcomes = await trio.to_thread.run_sync(
                self._decode_verify_store, layer, raw, planned.start, todo
            )
        except BaseException as exc:
            for key, flight in flights.items():
                self._resolve(key, flight, None, exc)
            if isinstance(exc, Exception):
                log.debug("range fetch failed layer=%s error=%r", layer.layer_id, exc)
                return None
            raise
        stored: list[tuple[str, int]] = []
        for (key, ref), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, bytes):
                self._resolve(key, flights[key], outcome, None)
                stored.append((key, len(outcome)))
            else:
                layer.stats.verify_failures += 1
                if layer.should_log("chunk", ref.blob_offset, outcome):
                    log.error(
                        "chunk rejected layer=%s digest=%s blob_offset=%d error=%s",
                        layer.layer_id,
                        layer.digest,
                        ref.blob_offset,
                        outcome,
                    )
                self._resolve(key, flights[key], None, outcome)
        # Waiters are released first; the LRU bookkeeping (and eviction) comes after.
        for key, size in stored:
            try:
                await self._cache.commit(key, size)
            except Exception as exc:  # eviction trouble must not fail the read
                log.warning("cache commit failed key=%s error=%r", key, exc)
        return raw

    def _decode_verify_store(
        self, layer: Layer, raw: bytes, start: int, todo: list[tuple[str, ChunkRef]]
    ) -> list[bytes | Exception]:
        """Worker thread: decode each chunk, check its digest, write it to the cache."""
        codec = layer.index.codec
        outcomes: list[bytes | Exception] = []
        for key, ref in todo:
            try:
                compressed = raw[ref.blob_offset - start : ref.blob_end - start]
                data = self._decode(codec, compressed, ref)
                if len(data) != ref.size:
                    raise FetchError(f"chunk decoded to {len(data)} bytes, expected {ref.size}")
                self._cache.write_verified(key, data, ref.digest)
                outcomes.append(data)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _resolve(
        self, key: str, flight: _Flight, data: bytes | None, error: BaseException | None
    ) -> None:
        if flight.done.is_set():
            return
        flight.data = data
        flight.error = error
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if data is not None:
            self._hot.put(key, data)
        flight.done.set()

    def is_cached(self, layer: Layer, ref: ChunkRef) -> bool:
        return ref.zeros or chunk_key(ref, layer.digest) in self._cache


def _next_number(planned: PlannedRange[ChunkTag], entry: int, number: int) -> int:
    """The chunk of ``entry`` after the last one the range covers."""
    last = number
    for (tag_entry, tag_number), _ in planned.chunks:
        if tag_entry == entry:
            last = max(last, tag_number)
    return last + 1
