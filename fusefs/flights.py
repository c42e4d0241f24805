"""Single flight for chunks: one fetch per missing chunk, shared by every reader of it.

Each missing chunk, by cache key and so across layers too, has at most one fetch in progress,
and concurrent readers wait for it. Fetches run in the fetcher's own nursery, so a reader that
goes away does not abort a fetch others are waiting on. A range claims its chunks before it is
requested, so a reader that needs one of them waits for that range instead of fetching the same
bytes again.

A chunk shared by layers of different blobs may be in flight from a blob that stalls. A reader
of another layer waits ``foreign_flight_patience`` for it, then fetches from its own blob, and
its verified bytes also release the first flight's readers.

Range requests are limited per blob (``blob_requests``), so a stalled blob holds only that many
of the registry client's connections. Readers come first for those slots
(``fusefs.request_slots``): background work never holds the last one, and a request some reader
waits on is granted before background ones.

Verified chunks are kept in memory twice over: a small LRU of hot chunks, so consecutive reads
inside one chunk decode it once, and the chunks on their way to the disk cache. The disk write
comes after the waiters are released (write-behind).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable

import trio

from fusefs.blob import forget_redirect
from fusefs.cache import ChunkCache, chunk_key, verify_chunk
from fusefs.fetch_config import Decoder, FetchConfig, FetchError
from fusefs.index import ChunkRef
from fusefs.inflated_spans import InflatedSpans, lead_bytes, span_layer
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import PlannedRange, group_chunks
from fusefs.request_slots import RequestSlots
from fusefs.span_mates import SpanFlights
from fusefs.trace import TRACE

# Chunks the end-of-fetch sweep looks at between two checkpoints.
_SWEEP_STEP = 2000

log = logging.getLogger(__name__)


class _Flight:
    __slots__ = ("background", "blob", "data", "done", "error", "wanted")

    def __init__(self, blob: str, *, background: bool = False) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.background = background  # claimed by background work: a failure is retried
        self.blob = blob  # digest of the blob the chunk is fetched from
        self.wanted = False  # a reader waits on it: its range request goes first for a slot


class Claim:
    """The chunks one range has claimed: readers of them wait for that range."""

    __slots__ = ("_flights",)

    def __init__(self, flights: dict[str, _Flight]) -> None:
        self._flights = flights

    def __bool__(self) -> bool:
        return bool(self._flights)


class _HotChunks:
    """A small LRU of decoded chunks."""

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


class ChunkFlights:
    """The chunks in flight, in memory and on their way to the disk cache."""

    def __init__(
        self, cache: ChunkCache, nursery: trio.Nursery, config: FetchConfig, decoder: Decoder
    ) -> None:
        self._cache = cache
        self._nursery = nursery
        self._config = config
        self._decode = decoder
        self._inflight: dict[str, _Flight] = {}
        # Fetches from a reader's own blob after another blob's flight of the chunk was slow.
        self._own_fetches: dict[tuple[str, str], _Flight] = {}
        self._blob_slots: dict[str, RequestSlots] = {}
        self._hot = _HotChunks(config.hot_bytes)
        self._spans = InflatedSpans(config.inflated_span_bytes)
        self._span_flights = SpanFlights()
        self._unwritten: dict[str, bytes] = {}  # verified chunks on their way to the disk cache
        self._writes_pending = 0
        self._writes_idle = trio.Event()
        self._writes_idle.set()

    @property
    def cache(self) -> ChunkCache:
        return self._cache

    @property
    def inflated_spans(self) -> InflatedSpans:
        return self._spans

    @property
    def in_flight(self) -> int:
        """How many chunks are being fetched."""
        return len(self._inflight)

    def in_memory(self, key: str) -> bytes | None:
        data = self._hot.get(key)
        return data if data is not None else self._unwritten.get(key)

    def is_missing(self, layer: Layer, ref: ChunkRef) -> bool:
        """Neither cached, in memory nor in flight."""
        key = chunk_key(ref, layer.digest)
        return (
            key not in self._inflight
            and key not in self._cache
            and key not in self._hot
            and key not in self._unwritten
        )

    def is_cached(self, layer: Layer, ref: ChunkRef) -> bool:
        return ref.zeros or chunk_key(ref, layer.digest) in self._cache

    # -- one reader's chunk --------------------------------------------------------------------

    async def wait(
        self, blob: str, key: str, ref: ChunkRef, fetch_miss: Callable[[Claim], Awaitable[None]]
    ) -> bytes:
        """The chunk's verified bytes from the flight in progress or from a new one, which
        loads the disk cache and on a miss calls ``fetch_miss`` with the chunk claimed.
        ``blob`` is the digest of the reader's own blob, which ``fetch_miss`` requests."""
        flight = await self._join(blob, key, ref, fetch_miss)
        if flight.error is not None and flight.background:
            # A failed background range is not the reader's failure: try once on its own.
            flight = await self._join(blob, key, ref, fetch_miss)
        if flight.error is not None:
            raise FetchError(str(flight.error)) from flight.error
        assert flight.data is not None
        return flight.data

    async def _join(
        self, blob: str, key: str, ref: ChunkRef, fetch_miss: Callable[[Claim], Awaitable[None]]
    ) -> _Flight:
        flight = self._inflight.get(key)
        if flight is None:
            flight = _Flight(blob)
            flight.wanted = True
            self._inflight[key] = flight
            self._nursery.start_soon(self._load_or_fetch, key, ref, flight, fetch_miss)
        else:
            self._want(flight)
        if flight.blob != blob:
            with trio.move_on_after(self._config.foreign_flight_patience):
                await flight.done.wait()
            if not flight.done.is_set():
                return await self._fetch_own(blob, key, ref, flight, fetch_miss)
        await flight.done.wait()
        return flight

    async def _fetch_own(
        self,
        blob: str,
        key: str,
        ref: ChunkRef,
        foreign: _Flight,
        fetch_miss: Callable[[Claim], Awaitable[None]],
    ) -> _Flight:
        """Fetch a chunk from the reader's own blob while another blob's flight of it is slow.
        Its bytes, verified against the same digest, release that flight's readers too."""
        own = self._own_fetches.get((key, blob))
        if own is None:
            own = _Flight(blob)
            own.wanted = True
            self._own_fetches[(key, blob)] = own
            self._nursery.start_soon(self._fetch_own_task, blob, key, ref, own, foreign, fetch_miss)
        await own.done.wait()
        return own

    async def _fetch_own_task(
        self,
        blob: str,
        key: str,
        ref: ChunkRef,
        own: _Flight,
        foreign: _Flight,
        fetch_miss: Callable[[Claim], Awaitable[None]],
    ) -> None:
        try:
            await self._load_or_fetch(key, ref, own, fetch_miss)
        finally:
            del self._own_fetches[(key, blob)]
        if own.data is not None:
            self._resolve(key, foreign, own.data, None)

    def _want(self, flight: _Flight) -> None:
        """A reader waits on ``flight``: the range request that fetches it, perhaps background
        work still waiting for a slot, now goes ahead of background ones."""
        if flight.wanted or flight.done.is_set():
            return
        flight.wanted = True
        slots = self._blob_slots.get(flight.blob)
        if slots is not None:
            slots.reconsider()

    async def _load_or_fetch(
        self,
        key: str,
        ref: ChunkRef,
        flight: _Flight,
        fetch_miss: Callable[[Claim], Awaitable[None]],
    ) -> None:
        # Runs in the fetcher's nursery: any exception must end up in the flight, not escape.
        try:
            data = await self._cache.load(key, ref.digest)
            if data is not None:
                self._resolve(key, flight, data, None)
                return
            await fetch_miss(Claim({key: flight}))
        except Exception as exc:
            self._resolve(key, flight, None, exc)
        finally:
            if not flight.done.is_set():  # cancelled at shutdown: release the waiters
                self._resolve(key, flight, None, FetchError("filesystem shutting down"))

    # -- ranges --------------------------------------------------------------------------------

    def claim(
        self, layer: Layer, planned: PlannedRange[ChunkTag], *, background: bool = False
    ) -> Claim:
        """Claim the chunks of ``planned`` nobody has claimed yet."""
        flights: dict[str, _Flight] = {}
        for _, ref in planned.chunks:
            key = chunk_key(ref, layer.digest)
            if key in flights or key in self._inflight:
                continue
            flight = _Flight(layer.digest, background=background)
            self._inflight[key] = flight
            flights[key] = flight
        return Claim(flights)

    def missing_part(
        self, layer: Layer, planned: PlannedRange[ChunkTag]
    ) -> PlannedRange[ChunkTag] | None:
        """The part of ``planned`` from its first to its last chunk that is neither cached nor
        in flight (those chunks only), or None when there is none."""
        chunks = tuple(
            (tag, ref)
            for tag, ref in planned.chunks
            if not ref.zeros and self.is_missing(layer, ref)
        )
        if not chunks:
            return None
        start = min(ref.blob_offset for _, ref in chunks)
        end = max(ref.blob_end for _, ref in chunks)
        return PlannedRange(start, end, chunks)

    async def request(
        self, layer: Layer, planned: PlannedRange[ChunkTag], flights: Collection[_Flight] = ()
    ) -> bytes:
        """The raw bytes of ``planned`` from the blob, counted on the layer. For a zTOC layer
        they start ``lead_bytes`` early, with the partial byte of the range's first span.
        ``flights`` are those the range resolves: while a reader waits on one, the request
        goes ahead of background ones for the blob's slots."""
        lead = lead_bytes(layer.index, planned.start)
        return await self.request_bytes(
            layer, planned.start - lead, planned.length + lead, flights
        )

    async def request_bytes(
        self, layer: Layer, start: int, length: int, flights: Collection[_Flight] = ()
    ) -> bytes:
        """The blob's bytes ``[start, start + length)``, under the blob's request limit and
        counted on the layer; the one place a range is read from a blob. While a reader waits
        on one of ``flights`` the request goes ahead of background ones."""
        slots = self._blob_slots.get(layer.digest)
        if slots is None:
            slots = self._blob_slots[layer.digest] = RequestSlots(self._config.blob_requests)
        try:
            async with slots.hold(lambda: any(flight.wanted for flight in flights)):
                started = trio.current_time()
                raw = await TRACE.read_at(layer.blob, start, length)
        finally:
            if slots.idle and self._blob_slots.get(layer.digest) is slots:
                del self._blob_slots[layer.digest]
        layer.stats.requests += 1
        layer.stats.fetched_bytes += len(raw)
        layer.stats.meters.fetched(len(raw), trio.current_time() - started)
        if len(raw) != length:
            raise FetchError(f"blob returned {len(raw)} bytes for a {length}-byte range")
        return raw

    async def fetch_background(
        self,
        layer: Layer,
        planned: PlannedRange[ChunkTag],
        *,
        read: Callable[[int, int], Awaitable[bytes]] | None = None,
        on_bytes: Callable[[], None] | None = None,
    ) -> bytes:
        """Request all of ``planned`` and fill the cache with the chunks still missing; returns
        the raw bytes, which the whole-blob check hashes. The missing chunks are claimed before
        the request, so a reader needing one of them waits for this range. ``read``, when
        given, gets the range's bytes ``[start, end)`` (lead byte first) instead of one request:
        the whole-blob check reads what readers fetched back from the held copy. ``on_bytes``
        is called once the bytes are in (or the request failed), before they are decoded: the
        range is off the link then."""
        missing = PlannedRange(
            planned.start,
            planned.end,
            tuple(c for c in planned.chunks if not c[1].zeros and self.is_missing(layer, c[1])),
        )
        claim = self.claim(layer, missing, background=True)
        try:
            if read is None:
                raw = await self.request(layer, planned, tuple(claim._flights.values()))
            else:
                first = planned.start - lead_bytes(layer.index, planned.start)
                raw = await read(first, planned.end)
        except BaseException as exc:
            self._fail(claim, exc)
            raise
        finally:
            if on_bytes is not None:
                on_bytes()
        if claim:
            await self.fetch_range(layer, planned, seed=claim, claimed=True, raw=raw)
        return raw[lead_bytes(layer.index, planned.start) :]

    async def fetch_claimed(
        self, layer: Layer, planned: PlannedRange[ChunkTag], claim: Claim
    ) -> None:
        """Fetch the chunks ``claim`` holds. On failure a reader waiting on a chunk of a
        background claim fetches it itself, so the failure is only logged at debug."""
        await self.fetch_range(layer, planned, seed=claim, claimed=True)

    async def fetch_rest(
        self, layer: Layer, chunks: Iterable[tuple[ChunkTag, ChunkRef]] | None = None
    ) -> int:
        """Make every chunk of ``layer`` (or ``chunks``, all of them, walked already) cached:
        wait for those in flight, fetch the others in coalesced ranges. Returns how many of
        those not cached at first are still not cached, which failed. One pass over the
        chunks, with a checkpoint every few thousand: the sweep after each layer's background
        fetch must not hold the trio thread for a whole layer."""
        pending: list[tuple[ChunkTag, str, ChunkRef]] = []
        walked = 0
        for tag, ref in layer.all_chunks() if chunks is None else chunks:
            walked += 1
            if walked % _SWEEP_STEP == 0:
                await trio.lowlevel.checkpoint()
            if ref.zeros:
                continue
            key = chunk_key(ref, layer.digest)
            flight = self._inflight.get(key)
            if flight is not None:
                await flight.done.wait()
            if key not in self._cache:
                pending.append((tag, key, ref))
        await self.writes_done()
        still_missing = (
            (tag, ref) for tag, _, ref in pending if self.is_missing(layer, ref)
        )
        for planned in group_chunks(
            still_missing, max_range=self._config.background_range, max_gap=self._config.max_gap
        ):
            await self.fetch_range(layer, planned)  # claims only what is still missing
        await self.writes_done()
        return sum(1 for _, key, _ in pending if key not in self._cache)

    async def fetch_range(
        self,
        layer: Layer,
        planned: PlannedRange[ChunkTag],
        *,
        seed: Claim | None = None,
        claimed: bool = False,
        raw: bytes | None = None,
    ) -> None:
        """Fetch ``planned``, or use ``raw``, its bytes, and fill the cache with its chunks.

        Only the chunks of ``seed`` are decoded, and with ``claimed`` false also those of the
        range nobody else has claimed. A failure is delivered to every reader waiting on one of
        those chunks.
        """
        flights = dict(seed._flights) if seed is not None else {}
        if not claimed:
            for key, flight in self.claim(layer, planned)._flights.items():
                flights.setdefault(key, flight)
        todo = [
            (key, ref)
            for key, ref in {chunk_key(r, layer.digest): r for _, r in planned.chunks}.items()
            if key in flights
        ]
        self._claim_mates(layer, todo, flights)
        start = planned.start - lead_bytes(layer.index, planned.start)
        fetched = raw is None
        busy: list[tuple[str, int]] = []
        try:
            outcomes = None
            if raw is None and span_layer(layer.index) is not None:
                offsets = {ref.blob_offset for _, ref in todo}
                await self._span_flights.wait_for_others(layer, offsets)
                busy = self._span_flights.start(layer, offsets)
                outcomes = await self._decode_inflated(layer, start, todo)
                fetched = outcomes is None
            if outcomes is None:
                if raw is None:
                    raw = await self.request(layer, planned, tuple(flights.values()))
                outcomes = await trio.to_thread.run_sync(
                    self._decode_verify, layer, raw, start, todo
                )
        except BaseException as exc:
            for key, flight in flights.items():
                self._resolve(key, flight, None, exc)
            if isinstance(exc, Exception):
                log.debug("range fetch failed layer=%s error=%r", layer.layer_id, exc)
                return
            raise
        finally:
            self._span_flights.end(busy)
        verified: list[tuple[str, bytes]] = []
        for (key, ref), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, bytes):
                # Held in memory until it is on disk, so nobody fetches it again meanwhile.
                self._unwritten[key] = outcome
                self._resolve(key, flights[key], outcome, None)
                verified.append((key, outcome))
            else:
                layer.stats.verify_failures += 1
                # Bytes from a redirect target that fail verification: ask the registry anew.
                forget_redirect(layer.blob)
                if layer.should_log("chunk", ref.blob_offset, outcome):
                    log.error(
                        "chunk rejected layer=%s digest=%s blob_offset=%d error=%s",
                        layer.layer_id,
                        layer.digest,
                        ref.blob_offset,
                        outcome,
                        extra={"event": "chunk_verification_failed"},
                    )
                self._resolve(key, flights[key], None, outcome)
        if verified:
            # Waiters are released first. The disk write, the LRU bookkeeping and eviction come
            # after, so a slow disk never delays a read: a file create can wait on another
            # program's fsync.
            # A new event only when the writes were idle: waiters on the current one must be
            # woken when the last pending write ends, not left on a replaced event.
            if not self._writes_pending:
                self._writes_idle = trio.Event()
            self._writes_pending += 1
            self._nursery.start_soon(self._write_behind, verified)
        if fetched and raw and layer.held is not None and len(verified) == len(todo):
            # A reader's bytes, all verified: kept so the whole-blob check need not fetch them
            # again. Waiters are released already, so this delays no reader.
            await layer.held.keep(start, raw)

    def _claim_mates(
        self, layer: Layer, todo: list[tuple[str, ChunkRef]], flights: dict[str, _Flight]
    ) -> None:
        """Add to ``todo`` the missing chunks sharing a zTOC span with one of its chunks (see
        ``fusefs.span_mates``), claimed as background work: a failure is the reader's to retry."""
        mates = self._span_flights.mates(layer, (ref for _, ref in todo))
        if not mates:
            return
        claim = self.claim(
            layer, PlannedRange(0, 0, tuple(m for m in mates if self.is_missing(layer, m[1]))),
            background=True,
        )
        for _, ref in mates:
            key = chunk_key(ref, layer.digest)
            if key in claim._flights and key not in flights:
                flights[key] = claim._flights[key]
                todo.append((key, ref))

    async def _decode_inflated(
        self, layer: Layer, start: int, todo: list[tuple[str, ChunkRef]]
    ) -> list[bytes | Exception] | None:
        """The chunks of ``todo`` decoded from spans another range left inflated, without a
        request; None when a span is not there (never inflated, or evicted meanwhile)."""
        ztoc = span_layer(layer.index)
        if ztoc is None or not self._spans.holds(
            layer.digest, {ztoc.span_of(ref) for _, ref in todo}
        ):
            return None
        outcomes = await trio.to_thread.run_sync(self._decode_verify, layer, b"", start, todo)
        return outcomes if all(isinstance(o, bytes) for o in outcomes) else None

    def _decode_verify(
        self, layer: Layer, raw: bytes, start: int, todo: list[tuple[str, ChunkRef]]
    ) -> list[bytes | Exception]:
        """Worker thread: decode each chunk and check its digest."""
        codec = layer.index.codec
        ztoc = span_layer(layer.index)
        failed_spans: dict[int, Exception] = {}
        outcomes: list[bytes | Exception] = []
        for _, ref in todo:
            try:
                if ztoc is not None:
                    data = self._spans.chunk(ztoc, layer.digest, ref, raw, start, failed_spans)
                else:
                    compressed = raw[ref.blob_offset - start : ref.blob_end - start]
                    data = self._decode(codec, compressed, ref)
                if len(data) != ref.size:
                    raise FetchError(f"chunk decoded to {len(data)} bytes, expected {ref.size}")
                verify_chunk(data, ref.digest)
                outcomes.append(data)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _fail(self, claim: Claim, error: BaseException) -> None:
        for key, flight in claim._flights.items():
            self._resolve(key, flight, None, error)

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

    # -- write-behind --------------------------------------------------------------------------

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
        """Wait until every chunk fetched so far is in the disk cache or failed to get there."""
        while self._writes_pending:
            await self._writes_idle.wait()
