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

from fusefs.cache import ChunkCache, chunk_key, verify_chunk
from fusefs.formats import decode_chunk
from fusefs.index import ChunkRef, Codec
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import PlannedRange, coalesce, group_chunks

log = logging.getLogger(__name__)

Decoder = Callable[[Codec, bytes, ChunkRef], bytes]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Tuning of the read path; the defaults suit a registry 1-50 ms away."""

    # A read miss waits for its whole range, and a program starting up misses file after file
    # at scattered places: each miss should cost little more than a round trip (startup
    # benchmark, 100 Mbit/s and 20 ms: imports 7.7 s with 1 MiB, 6.7 s with 512 KiB, about
    # 5.5 s with 128 KiB). A forward walk grows its ranges by itself (readahead, below).
    ondemand_range: int = 128 * 1024  # largest coalesced request for a read miss
    max_gap: int = 256 * 1024  # unrequested bytes a range may carry to join two chunks
    file_completion_window: int = 64 * MiB  # how much of a file its first read fetches ahead
    file_completion_range: int = 4 * MiB  # nobody waits on these: larger ranges, fewer trips
    file_completion_concurrency: int = 2
    # A program that misses on several files of one directory usually goes on with more of
    # them (python's __pycache__, a locale or plugin directory): the ``directory_misses``-th
    # miss there fetches the directory's other files at once, when they come to at most
    # ``directory_fetch_max`` compressed bytes (startup benchmark: 21 of the imports
    # workload's 58 misses were in usr/lib/python3.11/__pycache__, 2.4 MB in all).
    directory_misses: int = 3
    directory_fetch_max: int = 4 * MiB
    # A reader whose misses walk forward through the blob (``cat`` of every file, a big file
    # read from the start) gets each next range twice as large, up to this, and the range after
    # it is requested before the reader gets there, like the kernel's readahead.
    readahead_max_range: int = 8 * MiB
    background_range: int = 2 * MiB
    background_concurrency: int = 4
    # Background fetch starts a new range only after no reader has waited on the link for this
    # long: a program starting up reads file after file with short pauses, and every range in
    # flight is link time its next miss queues behind (startup benchmark: hello 3.8 s with one
    # background range allowed between misses, 2.7 s with none).
    quiet_period: float = 0.5
    # ... and not before the layer's first read miss or this long after attach: a container is
    # usually started right after its image is pulled, and its first reads should find the
    # link empty.
    first_read_grace: float = 2.0
    # ... unless readers have been waiting on and off for this long: then they are reading
    # much of the layer (a build, a scan, read-everything), and background fetch, several large
    # ranges at a time, gets the bytes to them sooner than their own misses one by one.
    long_read: float = 6.0
    hot_bytes: int = 32 * MiB  # decoded chunks kept in memory (a read is often < a chunk)


@dataclass(slots=True)
class _Readahead:
    """Where a layer's reader missed last, to tell a forward walk through the blob."""

    end: int  # one past the last byte requested for that miss (or ahead of it)
    window: int  # the size that range was planned with
    last: ChunkTag  # its last chunk: the next range ahead starts after it
    marker: int = -1  # a read at or after this offset (and before ``end``) goes further ahead


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
        self._busy_since = -float("inf")
        self._completion_slots = trio.Semaphore(self.config.file_completion_concurrency)
        self._readahead: dict[str, _Readahead] = {}
        self._directory_misses: dict[tuple[str, int], int] = {}
        self._unwritten: dict[str, bytes] = {}  # verified chunks on their way to the disk cache
        self._writes_pending = 0
        self._writes_idle = trio.Event()
        self._writes_idle.set()

    @property
    def cache(self) -> ChunkCache:
        return self._cache

    # -- priority ----------------------------------------------------------------------------

    @contextmanager
    def foreground(self) -> Iterator[None]:
        if self._foreground == 0:
            self._idle = trio.Event()
            now = trio.current_time()
            if now >= self._last_foreground + self.config.quiet_period:
                self._busy_since = now  # readers start waiting after a quiet time
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

    async def wait_until_quiet(self, attached_at: float) -> None:
        """Wait until background fetch may start a range: no reader has waited on the link for
        ``quiet_period`` seconds (and ``first_read_grace`` has passed since ``attached_at``, a
        trio clock time), or readers have been waiting on and off for ``long_read`` seconds."""
        grace_end = attached_at + self.config.first_read_grace
        while True:
            now = trio.current_time()
            if self._foreground or now < self._last_foreground + self.config.quiet_period:
                long_read_from = self._busy_since + self.config.long_read
                if now >= long_read_from:
                    return
                if self._foreground:
                    with trio.move_on_at(long_read_from):
                        await self.wait_for_idle()
                else:
                    await trio.sleep_until(
                        min(self._last_foreground + self.config.quiet_period, long_read_from)
                    )
            elif now < grace_end:
                await trio.sleep_until(grace_end)
            else:
                return

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
        ahead = self._readahead.get(layer.layer_id)
        if ahead is not None and 0 <= ahead.marker <= chunks[number].blob_offset < ahead.end:
            # The reader reached the range requested ahead of it: request the next, larger one.
            ahead.marker = -1
            ahead.window = min(2 * ahead.window, self._readahead_cap())
            self._start_ahead(layer, ahead)
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
        if data is None:
            data = self._unwritten.get(key)
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
            window = self._miss_window(layer, ref)
            planned = coalesce(
                [((entry, number), ref)],
                layer.chunks_after(entry, number),
                wanted=lambda candidate: self._is_missing(layer, candidate),
                max_range=window,
                max_gap=self.config.max_gap,
            )
            self._after_miss(layer, planned, window)
            self._note_directory_miss(layer, entry)
            await self.fetch_range(layer, planned, seed_flights={key: flight})
        except Exception as exc:
            self._resolve(key, flight, None, exc)
        finally:
            if not flight.done.is_set():  # cancelled at shutdown: release the waiters
                self._resolve(key, flight, None, FetchError("filesystem shutting down"))

    # -- directories -------------------------------------------------------------------------

    def _note_directory_miss(self, layer: Layer, entry: int) -> None:
        """Count misses per directory; the ``directory_misses``-th one fetches the rest of it."""
        key = (layer.layer_id, layer.index.parent(entry))
        count = self._directory_misses.get(key, 0) + 1
        self._directory_misses[key] = count
        if count == self.config.directory_misses:
            self._nursery.start_soon(self._fetch_directory, layer, key[1])

    async def _fetch_directory(self, layer: Layer, directory: int) -> None:
        """Fetch the missing chunks of the files directly in ``directory`` if they come to at
        most ``directory_fetch_max`` compressed bytes; nobody waits on these ranges."""
        try:
            missing: list[tuple[ChunkTag, ChunkRef]] = []
            total = 0
            for _, child in layer.index.children(directory):
                for number, ref in enumerate(layer.index.chunks(child)):
                    if ref.zeros or not self._is_missing(layer, ref):
                        continue
                    total += ref.blob_end - ref.blob_offset
                    if total > self.config.directory_fetch_max:
                        return  # a directory of big files: its misses stay on demand
                    missing.append(((child, number), ref))
            missing.sort(key=lambda chunk: chunk[1].blob_offset)
            async with trio.open_nursery() as nursery:
                for planned in group_chunks(
                    missing,
                    max_range=self.config.file_completion_range,
                    max_gap=self.config.max_gap,
                ):
                    await self._completion_slots.acquire()
                    flights = self._claim(layer, planned, background=True)
                    nursery.start_soon(self._fetch_released, layer, planned, flights)
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

    # -- readahead ---------------------------------------------------------------------------

    def _miss_window(self, layer: Layer, ref: ChunkRef) -> int:
        """The range size for a miss at ``ref``: doubled while misses continue where the last
        range ended, ``ondemand_range`` for a miss anywhere else."""
        base = self.config.ondemand_range
        ahead = self._readahead.get(layer.layer_id)
        if ahead is None or abs(ref.blob_offset - ahead.end) > self.config.max_gap:
            return base
        return min(max(2 * ahead.window, base), self._readahead_cap())

    def _readahead_cap(self) -> int:
        return max(self.config.readahead_max_range, self.config.ondemand_range)

    def _after_miss(self, layer: Layer, planned: PlannedRange[ChunkTag], window: int) -> None:
        ahead = _Readahead(end=planned.end, window=window, last=planned.chunks[-1][0])
        self._readahead[layer.layer_id] = ahead
        if window > self.config.ondemand_range:
            # The second forward miss in a row: a walk through the blob. Request the next
            # range now, so the reader finds it in flight or cached instead of missing again.
            self._start_ahead(layer, ahead)

    def _start_ahead(self, layer: Layer, ahead: _Readahead) -> None:
        """Request the ``ahead.window`` bytes after ``ahead.last`` that are not yet cached."""
        following = layer.chunks_after(*ahead.last)
        seed: tuple[ChunkTag, ChunkRef] | None = None
        for tag, ref in following:
            if ref.blob_offset > ahead.end + ahead.window:
                break  # all cached for a whole window: let the next miss decide
            if not ref.zeros and self._is_missing(layer, ref):
                seed = (tag, ref)
                break
        if seed is None:
            return
        planned = coalesce(
            [seed],
            following,
            wanted=lambda candidate: self._is_missing(layer, candidate),
            max_range=ahead.window,
            max_gap=self.config.max_gap,
        )
        flights = self._claim(layer, planned, background=True)
        ahead.end = planned.end
        ahead.last = planned.chunks[-1][0]
        ahead.marker = planned.start
        self._nursery.start_soon(self._fetch_ahead, layer, planned, flights)

    async def _fetch_ahead(
        self, layer: Layer, planned: PlannedRange[ChunkTag], flights: dict[str, _Flight]
    ) -> None:
        # Claimed as background: a reader waiting on a chunk of a failed range fetches it
        # itself, so a failure here is only logged (at debug, by fetch_range).
        await self.fetch_range(layer, planned, seed_flights=flights, claimed=True)

    def _is_missing(self, layer: Layer, ref: ChunkRef) -> bool:
        key = chunk_key(ref, layer.digest)
        return (
            key not in self._inflight
            and key not in self._cache
            and key not in self._hot
            and key not in self._unwritten
        )

    async def _complete_file(self, layer: Layer, entry: int, start_number: int) -> None:
        """Fetch the remaining chunks of a file after its first read, a few ranges at a time."""
        try:
            chunks = layer.index.chunks(entry)
            window_end = chunks[start_number].blob_offset + self.config.file_completion_window
            number = start_number
            async with trio.open_nursery() as nursery:
                while number < len(chunks) and chunks[number].blob_offset < window_end:
                    # A slot first, then the plan: what readers fetched meanwhile drops out.
                    await self._completion_slots.acquire()
                    while number < len(chunks) and (
                        chunks[number].zeros or not self._is_missing(layer, chunks[number])
                    ):
                        number += 1
                    if number >= len(chunks) or chunks[number].blob_offset >= window_end:
                        self._completion_slots.release()
                        break
                    # This file's chunks only: the neighbours are a guess, and a large guess in
                    # flight is link time the reader's next miss (often in another directory)
                    # waits for. Readahead and directory fetch cover the walks that want them.
                    planned = coalesce(
                        [((entry, number), chunks[number])],
                        (((entry, k), chunks[k]) for k in range(number + 1, len(chunks))),
                        wanted=lambda candidate: self._is_missing(layer, candidate),
                        max_range=self.config.file_completion_range,
                        max_gap=self.config.max_gap,
                    )
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

    def missing_part(
        self, layer: Layer, planned: PlannedRange[ChunkTag]
    ) -> PlannedRange[ChunkTag] | None:
        """The part of ``planned`` from its first to its last chunk that is neither cached nor
        in flight (those chunks only), or None when there is none."""
        chunks = tuple(
            (tag, ref)
            for tag, ref in planned.chunks
            if not ref.zeros and self._is_missing(layer, ref)
        )
        if not chunks:
            return None
        start = min(ref.blob_offset for _, ref in chunks)
        end = max(ref.blob_end for _, ref in chunks)
        return PlannedRange(start, end, chunks)

    async def fetch_rest(self, layer: Layer) -> int:
        """Make every chunk of ``layer`` cached: wait for those in flight, fetch the others in
        coalesced ranges. Returns how many are still not cached (failed fetches)."""
        pending: list[tuple[ChunkTag, ChunkRef]] = []
        for tag, ref in layer.all_chunks():
            if ref.zeros:
                continue
            key = chunk_key(ref, layer.digest)
            flight = self._inflight.get(key)
            if flight is not None:
                await flight.done.wait()
            if key not in self._cache:
                pending.append((tag, ref))
        await self.writes_done()
        still_missing = (chunk for chunk in pending if self._is_missing(layer, chunk[1]))
        for planned in group_chunks(
            still_missing, max_range=self.config.background_range, max_gap=self.config.max_gap
        ):
            await self.fetch_range(layer, planned)  # claims only what is still missing
        await self.writes_done()
        return sum(
            1
            for _, ref in layer.all_chunks()
            if not ref.zeros and chunk_key(ref, layer.digest) not in self._cache
        )

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
                self._decode_verify, layer, raw, planned.start, todo
            )
        except BaseException as exc:
            for key, flight in flights.items():
                self._resolve(key, flight, None, exc)
            if isinstance(exc, Exception):
                log.debug("range fetch failed layer=%s error=%r", layer.layer_id, exc)
                return None
            raise
        verified: list[tuple[str, bytes]] = []
        for (key, ref), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, bytes):
                # Held in memory until it is on disk, so nobody fetches it again meanwhile.
                self._unwritten[key] = outcome
                self._resolve(key, flights[key], outcome, None)
                verified.append((key, outcome))
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
        if verified:
            # Waiters are released first; the disk write, the LRU bookkeeping and eviction
            # come after, so a slow disk (a file create can wait on another program's fsync)
            # never delays a read.
            self._writes_pending += 1
            self._writes_idle = trio.Event()
            self._nursery.start_soon(self._write_behind, verified)
        return raw

    def _decode_verify(
        self, layer: Layer, raw: bytes, start: int, todo: list[tuple[str, ChunkRef]]
    ) -> list[bytes | Exception]:
        """Worker thread: decode each chunk and check its digest."""
        codec = layer.index.codec
        outcomes: list[bytes | Exception] = []
        for _, ref in todo:
            try:
                compressed = raw[ref.blob_offset - start : ref.blob_end - start]
                data = self._decode(codec, compressed, ref)
                if len(data) != ref.size:
                    raise FetchError(f"chunk decoded to {len(data)} bytes, expected {ref.size}")
                verify_chunk(data, ref.digest)
                outcomes.append(data)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _write_behind(self, chunks: list[tuple[str, bytes]]) -> None:
        """Write verified chunks to the disk cache, then record them (LRU, eviction)."""
        try:
            written = await trio.to_thread.run_sync(self._write_sync, chunks)
            for key, size in written:
                try:
                    await self._cache.commit(key, size)
                except Exception as exc:  # eviction trouble must not fail anything
                    log.warning("cache commit failed key=%s error=%r", key, exc)
        finally:
            for key, _ in chunks:
                self._unwritten.pop(key, None)
            self._writes_pending -= 1
            if not self._writes_pending:
                self._writes_idle.set()

    def _write_sync(self, chunks: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
        written: list[tuple[str, int]] = []
        for key, data in chunks:
            try:
                self._cache.write_verified(key, data, None)  # verified when decoded
                written.append((key, len(data)))
            except Exception as exc:  # a full disk: the chunk stays fetchable, just not cached
                log.warning("cache write failed key=%s error=%r", key, exc)
        return written

    async def writes_done(self) -> None:
        """Wait until every chunk fetched so far is in the disk cache (or failed to get there)."""
        while self._writes_pending:
            await self._writes_idle.wait()

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
