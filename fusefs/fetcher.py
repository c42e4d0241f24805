"""Chunk reads: the cache first, else one coalesced range request shared by every reader.

``ChunkFetcher`` puts together three parts: ``fusefs.flights`` (single flight, hot chunks,
write-behind), ``fusefs.read_policy`` (what a miss fetches besides its chunk, and what is
fetched ahead of readers) and the priority of readers over background work, here.

Priority: a reader waiting on a chunk that is not in memory marks itself foreground. Background
fetch calls ``background_turn`` before each new range. That waits until no reader has waited
for ``quiet_period`` and ``first_read_grace`` has passed since attach, unless readers have been
waiting on and off for ``long_read`` and fetched ``long_read_bytes`` of the layer. Within
``background_yield`` of a reader's wait (and not in a long read) it also waits until fewer than
``yield_depth`` background ranges of this fetcher's layers are on the link under that rule, and
caps the range at ``yield_range``: readers that pause between misses find at most a few small
ranges on the link, and the link is not left idle for a round trip between two of them. A
range leaves the link when its bytes have arrived (``BackgroundTurn.release``), before they are
decoded. Each background range also takes a place in the node's budget
(``fusefs.background_budget``, ``background_ranges`` for all layers, in attach order) until its
chunks are decoded; while ``crowd_readers`` readers wait on the link at once, and for a while
after, all layers together hold one. Background ranges are small enough (2 MiB) that a reader
who needs one of their chunks never waits long for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import trio

from fusefs.background_budget import BackgroundBudget, BudgetPlace
from fusefs.cache import ChunkCache, chunk_key
from fusefs.chunk_blocks import has_blocks
from fusefs.fetch_config import Decoder, FetchConfig, FetchError, ReadDeadlineExceeded
from fusefs.flights import ChunkFlights, Claim
from fusefs.formats import decode_chunk
from fusefs.index import ChunkRef
from fusefs.layer import Layer, chunk_at
from fusefs.read_policy import ReadPolicy
from fusefs.stats import ON_DEMAND

__all__ = [
    "BackgroundTurn",
    "ChunkFetcher",
    "Decoder",
    "FetchConfig",
    "FetchError",
    "ReadDeadlineExceeded",
]

log = logging.getLogger(__name__)

# While readers have waited long enough but not fetched ``long_read_bytes`` yet, background
# fetch looks at their bytes again this often.
_LONG_READ_POLL = 0.1


class BackgroundTurn:
    """Leave for one background range: at most ``max_bytes`` long (None: any length). Call
    ``release`` when the range is over (fetched or failed), once or more."""

    __slots__ = ("_release", "max_bytes")

    def __init__(self, max_bytes: int | None, release: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class ChunkFetcher:
    """Serves chunk bytes to the read path, prefetch and background fetch."""

    def __init__(
        self,
        cache: ChunkCache,
        nursery: trio.Nursery,
        config: FetchConfig | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        self.config = config or FetchConfig()
        self.flights = ChunkFlights(cache, nursery, self.config, decoder or decode_chunk)
        self._policy = ReadPolicy(self.flights, nursery, self.config)
        self._foreground = 0
        self._idle = trio.Event()
        self._idle.set()
        self._last_foreground = -float("inf")
        self._busy_since = -float("inf")
        # Background ranges on the link under ``background_yield`` (``yield_depth`` at most),
        # and the event the end of one sets.
        self._yielding_ranges = 0
        self._yield_free = trio.Event()
        # Background ranges of all layers together, in attach order, fewer while crowded.
        self.budget = BackgroundBudget(self.config.background_ranges)

    @property
    def cache(self) -> ChunkCache:
        return self.flights.cache

    async def writes_done(self) -> None:
        """Wait until every chunk fetched so far is in the disk cache or failed to get there."""
        await self.flights.writes_done()

    # -- priority ----------------------------------------------------------------------------

    @contextmanager
    def foreground(self) -> Iterator[None]:
        if self._foreground == 0:
            self._idle = trio.Event()
            now = trio.current_time()
            if now >= self._last_foreground + self.config.quiet_period:
                self._busy_since = now  # readers start waiting after a quiet time
        self._foreground += 1
        crowd = self.config.crowd_readers
        if self._foreground == crowd:
            self.budget.crowded(math.inf)  # for as long as the crowd waits
        try:
            yield
        finally:
            self._foreground -= 1
            if self._foreground == crowd - 1:
                # And a while after: readers of a crowd come back with their next miss.
                config = self.config
                hold = max(config.quiet_period, config.background_yield)
                self.budget.crowded(trio.current_time() + hold)
            if self._foreground == 0:
                self._last_foreground = trio.current_time()
                self._idle.set()

    async def wait_for_idle(self) -> None:
        while self._foreground:
            await self._idle.wait()

    async def background_turn(
        self, attached_at: float, layer: Layer | None = None
    ) -> BackgroundTurn:
        """Wait until background fetch may start a range (``wait_until_quiet``), and say how
        long it may be. Within ``background_yield`` seconds of a reader's wait, unless readers
        are in a long read, ``yield_depth`` ranges of at most ``yield_range`` bytes for all
        layers together: this waits until one of those before it is off the link."""
        config = self.config
        while True:
            long_read = await self._wait_quiet(attached_at, layer)
            yield_until = self._last_foreground + config.background_yield
            if long_read or config.background_yield <= 0 or trio.current_time() >= yield_until:
                return BackgroundTurn(None)
            if self._yielding_ranges < config.yield_depth:
                self._yielding_ranges += 1
                return BackgroundTurn(config.yield_range, self._end_yielding_range)
            with trio.move_on_at(yield_until):
                await self._yield_free.wait()

    def _end_yielding_range(self) -> None:
        self._yielding_ranges -= 1
        # Wake every waiter; each checks the count again, and those that lose wait on a new event.
        self._yield_free.set()
        self._yield_free = trio.Event()

    async def background_place(self, layer: Layer) -> BudgetPlace:
        """A place in the node's background budget for one range of ``layer``; release it
        when the range's chunks are decoded or it failed."""
        return await self.budget.acquire(layer.attach_order)

    async def wait_until_quiet(self, attached_at: float, layer: Layer | None = None) -> None:
        """Wait until background fetch may start a range: no reader has waited on the link for
        ``quiet_period`` seconds and ``first_read_grace`` has passed since ``attached_at``, a
        trio clock time. Or readers have been waiting on and off for ``long_read`` seconds and
        fetched ``long_read_bytes`` of ``layer`` on demand (without a layer: time alone)."""
        await self._wait_quiet(attached_at, layer)

    async def _wait_quiet(self, attached_at: float, layer: Layer | None) -> bool:
        """``wait_until_quiet``; True when it returns for a long read (readers still busy)."""
        grace_end = attached_at + self.config.first_read_grace
        while True:
            now = trio.current_time()
            if self._foreground or now < self._last_foreground + self.config.quiet_period:
                long_read_from = self._busy_since + self.config.long_read
                if now >= long_read_from:
                    if self._read_enough(layer):
                        return True
                    long_read_from = now + _LONG_READ_POLL
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
                return False

    def _read_enough(self, layer: Layer | None) -> bool:
        """Whether readers fetched enough of ``layer`` to be past a container's first reads."""
        if layer is None:
            return True
        return layer.stats.meters.fetched_bytes[ON_DEMAND] >= self.config.long_read_bytes

    # -- the read path -----------------------------------------------------------------------

    async def read(self, layer: Layer, entry: int, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of a regular file, short at end of file.

        ``ReadDeadlineExceeded`` after ``read_deadline`` seconds. The fetches it waited on go
        on in the fetcher's nursery, so a later read may find their chunks."""
        deadline = self.config.read_deadline
        with trio.move_on_after(deadline):
            return await self._read(layer, entry, offset, size)
        raise ReadDeadlineExceeded(f"no bytes after {deadline:g} s (read deadline)")

    async def _read(self, layer: Layer, entry: int, offset: int, size: int) -> bytes:
        file_size = layer.index.attr(entry).size
        end = min(file_size, offset + size)
        if offset >= end:
            return b""
        chunks = layer.index.chunks(entry)
        number = chunk_at(chunks, offset)
        first_number = number
        self._policy.before_read(layer, chunks[number])
        parts: list[memoryview] = []
        position = offset
        while position < end:
            if number >= len(chunks):
                raise FetchError(f"chunks of entry {entry} end before its size {file_size}")
            ref = chunks[number]
            lo = position - ref.file_offset
            hi = min(ref.size, end - ref.file_offset)
            parts.append(await self._chunk_part(layer, entry, chunks, number, lo, hi))
            position = ref.file_offset + hi
            number += 1
        if layer.mark_read(entry):
            self._policy.after_first_read(layer, entry, first_number, number)
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)

    async def _chunk_part(
        self, layer: Layer, entry: int, chunks: Sequence[ChunkRef], number: int, lo: int, hi: int
    ) -> memoryview:
        """Bytes ``[lo, hi)`` of one chunk. A hole is made for the range alone, since it may be
        larger than memory; a big chunk in the disk cache is read in checked blocks."""
        ref = chunks[number]
        if ref.zeros:
            return memoryview(bytes(hi - lo))
        if has_blocks(ref.size):
            key = chunk_key(ref, layer.digest)
            if self.flights.in_memory(key) is None:
                part = await self.cache.load_range(key, ref.size, lo, hi)
                if part is not None:
                    return memoryview(part)
        data = await self.chunk(layer, entry, chunks, number)
        if len(data) != ref.size:
            raise FetchError(f"chunk {number} of entry {entry} decoded to a wrong size")
        return memoryview(data)[lo:hi]

    async def chunk(
        self, layer: Layer, entry: int, chunks: Sequence[ChunkRef], number: int
    ) -> bytes:
        """One chunk's verified bytes, from memory, the disk cache, or a shared fetch."""
        ref = chunks[number]
        if ref.zeros:
            return bytes(ref.size)
        key = chunk_key(ref, layer.digest)
        data = self.flights.in_memory(key)
        if data is not None:
            return data

        async def fetch_miss(claim: Claim) -> None:
            await self._policy.fetch_miss(layer, entry, chunks, number, claim)

        # Only a reader that waits on the link counts as foreground: hits in memory and in the
        # disk cache must not pause background fetch. Read-everything reads the chunks
        # background fetch and readahead brought in from the disk cache, on and on: counted as
        # waits, they stopped background fetch for 8 s at a time until the reader missed again
        # (startup benchmark, 100 Mbit/s, a loaded machine).
        if key in self.flights.cache:
            return await self.flights.wait(layer.digest, key, ref, fetch_miss)
        with self.foreground():
            return await self.flights.wait(layer.digest, key, ref, fetch_miss)
