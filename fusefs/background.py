"""Prefetch and background fetch of one layer, and the check that the layer is verified.

On attach the landmark-prioritized range ``[0, prefetch_end)`` is fetched in one request. With
background fetch on, the rest of the blob follows in large ranges, several at a time, each one
started only while readers leave the link alone (``ChunkFetcher.background_turn``): soon after a
reader waited, a few small ranges at a time for all layers. A range in flight is time a reader's
next miss waits, and a reader walking through the blob fetches ahead by itself
(``fusefs.read_policy``). A range leaves the link when its bytes are in, before they are decoded
and cached, so the next one is requested while the daemon works on them.

Every chunk is checked against its digest when it is decoded. How the whole layer is verified
depends on the layer. When the chunk digests prove the blob (``chunks_prove_blob``), only the
missing chunks are fetched and nothing is hashed. Otherwise the whole blob is fetched and passes
through a sha256 in blob order, checked against the blob digest once the last range is in: the
one check that also covers the TOC and chunks without a digest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from fusefs.background_budget import BudgetPlace
from fusefs.fetcher import BackgroundTurn, ChunkFetcher
from fusefs.held_bytes import HeldBytes
from fusefs.index import ChunkRef
from fusefs.inflated_spans import lead_bytes, span_layer
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import PlannedRange, split_blob
from fusefs.stats import BACKGROUND, PREFETCH, fetch_kind, set_fetch_kind

log = logging.getLogger(__name__)

_HASH_OFF_THREAD = 1 << 20  # hash bigger buffers on a worker thread (hashlib drops the GIL)


async def prefetch(fetcher: ChunkFetcher, layer: Layer) -> None:
    """Fetch ``[0, prefetch_end)``, the landmark files, in one request. Its chunks are verified;
    the blob is not, as the rest of it is never fetched."""
    end = layer.index.prefetch_end
    if not end:
        return
    ranges = split_blob(
        layer.all_chunks(), blob_size=layer.blob.size, range_size=end, first_cut=end
    )
    first = next(ranges, None)
    if first is None or first.end > end:
        return
    with fetch_kind(PREFETCH):
        await fetcher.flights.fetch_background(layer, first)
    await fetcher.writes_done()
    log.info(
        "prefetch done layer=%s digest=%s bytes=%d chunks=%d",
        layer.layer_id,
        layer.digest,
        first.length,
        len(first.chunks),
    )


async def fetch_everything(
    fetcher: ChunkFetcher, layer: Layer, plan: LayerPlan | None = None
) -> None:
    """Fetch the whole blob (prefetch range first), fill the cache, and verify the blob digest.
    ``plan``: the layer's walk, when the caller made it already."""
    config = fetcher.config
    if plan is None:
        plan = await plan_layer(fetcher, layer)
    ranges = iter(plan.ranges)
    hasher = hashlib.sha256()
    hashed = _OrderedHasher(hasher, config.background_concurrency)
    started = trio.current_time()
    try:
        await _fetch_and_hash_all(fetcher, layer, ranges, hashed, started)
    finally:
        if layer.held is not None:
            layer.held.close()
            layer.held = None
    await fetcher.writes_done()
    actual = "sha256:" + hasher.hexdigest()
    if span_layer(layer.index) is not None:
        # What the whole-blob check of a zTOC layer cost on the link, and what readers' held
        # bytes saved it: the benchmark reads this line.
        log.info(
            "ztoc background fetch done layer=%s digest=%s fetched_bytes=%d "
            "held_bytes_reused=%d blob_size=%d",
            layer.layer_id,
            layer.digest,
            hashed.fetched,
            hashed.reused,
            layer.blob.size,
            extra={
                "event": "ztoc_background_fetched",
                "fetched_bytes": hashed.fetched,
                "held_bytes_reused": hashed.reused,
            },
        )
    _record_outcome(
        layer, started, by="blob-digest", failure=None if actual == layer.digest else
        f"layer blob digest mismatch layer={layer.layer_id} digest={layer.digest} actual={actual}",
    )


async def _fetch_and_hash_all(
    fetcher: ChunkFetcher,
    layer: Layer,
    ranges: Iterator[PlannedRange[ChunkTag]],
    hashed: _OrderedHasher,
    started: float,
) -> None:
    async with trio.open_nursery() as nursery:
        for number, planned in enumerate(ranges):
            await hashed.slots.acquire()
            if number == 0 and layer.index.prefetch_end:
                # The prefetch range goes first and alone, whatever readers are doing: it holds
                # what the container will read first, so it gets the whole link.
                with fetch_kind(PREFETCH):
                    await _fetch_and_hash(fetcher, layer, planned, number, hashed)
                continue
            # The whole blob is hashed in these ranges, so they are not cut: a turn soon after
            # a reader only keeps them one at a time.
            turn = await fetcher.background_turn(started, layer)
            place = await _place_for(fetcher, layer, turn)
            nursery.start_soon(
                _fetch_and_hash_turn, fetcher, layer, planned, number, hashed, turn, place
            )


async def _place_for(fetcher: ChunkFetcher, layer: Layer, turn: BackgroundTurn) -> BudgetPlace:
    """The range's place in the node's budget; a layer detached while it waits gives its turn
    back, or the yield depth of every layer would shrink for good."""
    try:
        return await fetcher.background_place(layer)
    except BaseException:
        turn.release()
        raise


async def _fetch_and_hash_turn(
    fetcher: ChunkFetcher,
    layer: Layer,
    planned: PlannedRange[ChunkTag],
    number: int,
    hashed: _OrderedHasher,
    turn: BackgroundTurn,
    place: BudgetPlace,
) -> None:
    try:
        await _fetch_and_hash(fetcher, layer, planned, number, hashed, on_bytes=turn.release)
    finally:
        turn.release()
        place.release()


def _record_outcome(layer: Layer, started: float, *, by: str, failure: str | None) -> None:
    """Background fetch is over: record whether the layer is verified, and say so in the log
    (the benchmark and operators look for "layer fully fetched and verified")."""
    layer.stats.background_done = True
    layer.stats.blob_verified = failure is None
    layer.stats.meters.background_millis.observe((trio.current_time() - started) * 1e3)
    if failure is None:
        log.info(
            "layer fully fetched and verified layer=%s digest=%s seconds=%.3f by=%s",
            layer.layer_id,
            layer.digest,
            trio.current_time() - started,
            by,
        )
    else:
        layer.stats.errors += 1
        layer.stats.last_error = failure
        if by == "blob-digest":
            layer.stats.meters.blob_verify_failures += 1
            log.error("%s", failure, extra={"event": "blob_verification_failed"})
        else:
            log.error("%s", failure)


def hold_reader_bytes(fetcher: ChunkFetcher, layer: Layer) -> None:
    """Keep what readers of a zTOC layer fetch until ``fetch_everything`` hashes it. Readers of
    such a layer fetch whole compressed spans, which the blob check would otherwise fetch again."""
    if span_layer(layer.index) is not None and layer.held is None:
        layer.held = HeldBytes(fetcher.flights.cache.directory, layer.blob.size)


@dataclass(slots=True)
class LayerPlan:
    """What one walk over a layer's chunks gives background fetch: the ranges covering the
    blob, the chunks no range carries, and whether the chunk digests prove the blob."""

    ranges: list[PlannedRange[ChunkTag]]
    left_out: list[tuple[ChunkTag, ChunkRef]]
    proves_blob: bool

    def chunks(self) -> Iterator[tuple[ChunkTag, ChunkRef]]:
        for planned in self.ranges:
            yield from planned.chunks
        yield from self.left_out


async def plan_layer(fetcher: ChunkFetcher, layer: Layer) -> LayerPlan:
    """Walk the layer's chunks once, a range at a time with a checkpoint between, so that
    twenty layers attached at once leave the trio thread to readers. Building each chunk's
    ``ChunkRef`` is most of a walk's cost, and background fetch walked every layer four times
    (``chunks_prove_blob``, ``split_blob``, ``fetch_rest`` twice): 6.1 % of the daemon's
    samples in benchmarks/scale.py's CRI arm."""
    proves = layer.index.toc_trusted

    def checked() -> Iterator[tuple[ChunkTag, ChunkRef]]:
        nonlocal proves
        for tag, ref in layer.all_chunks():
            if proves and not ref.zeros and ref.digest is None:
                proves = False
            yield tag, ref

    left_out: list[tuple[ChunkTag, ChunkRef]] = []
    ranges: list[PlannedRange[ChunkTag]] = []
    for planned in split_blob(
        checked(),
        blob_size=layer.blob.size,
        range_size=fetcher.config.background_range,
        first_cut=layer.index.prefetch_end,
        left_out=left_out,
    ):
        ranges.append(planned)
        await trio.lowlevel.checkpoint()
    return LayerPlan(ranges, left_out, proves)


def chunks_prove_blob(layer: Layer) -> bool:
    """Whether the chunk digests alone check every byte a reader can get: the TOC matched a
    digest from the manifest and every chunk with bytes in the blob has a digest."""
    if not layer.index.toc_trusted:
        return False
    return all(ref.zeros or ref.digest is not None for _, ref in layer.all_chunks())


async def fetch_missing(
    fetcher: ChunkFetcher, layer: Layer, plan: LayerPlan | None = None
) -> None:
    """Fetch every chunk that is not cached yet (prefetch range first), in large ranges that
    skip what readers already fetched; for layers whose chunk digests prove the blob.
    ``plan``: the layer's walk, when the caller made it already; the end-of-fetch sweep goes
    over its chunks instead of walking the layer again."""
    config = fetcher.config
    if plan is None:
        plan = await plan_layer(fetcher, layer)
    ranges = plan.ranges
    # Ranges on the link, and ranges in memory (on the link or being decoded): a range leaves
    # the link when its bytes are in, and the next one goes out while they are decoded.
    on_link = trio.Semaphore(config.background_concurrency)
    in_memory = trio.Semaphore(2 * config.background_concurrency)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for number, planned in enumerate(ranges):
            if number == 0 and layer.index.prefetch_end:
                # The landmark range: first and alone.
                with fetch_kind(PREFETCH):
                    await fetcher.flights.fetch_background(layer, planned)
                continue
            rest: PlannedRange[ChunkTag] | None = planned
            while rest is not None:
                if fetcher.flights.missing_part(layer, rest) is None:
                    break  # a reader (or its readahead) fetched all of it already
                await in_memory.acquire()
                await on_link.acquire()
                turn = await fetcher.background_turn(started, layer)
                place = await _place_for(fetcher, layer, turn)
                missing = fetcher.flights.missing_part(layer, rest)  # readers went on meanwhile
                if missing is None:
                    place.release()
                    turn.release()
                    on_link.release()
                    in_memory.release()
                    break
                # Soon after a reader, a small head of the range now and the rest on a later
                # turn, so that the reader's next miss finds little ahead of it on the link.
                piece, rest = cut_range(missing, turn.max_bytes)
                nursery.start_soon(
                    _fetch_then_release,
                    fetcher,
                    layer,
                    piece,
                    _OffLink(turn, on_link),
                    in_memory,
                    place,
                )
    still_missing = await fetcher.flights.fetch_rest(layer, plan.chunks())
    _record_outcome(
        layer, started, by="chunk-digests", failure=None if still_missing == 0 else
        f"background fetch incomplete layer={layer.layer_id} digest={layer.digest} "
        f"missing_chunks={still_missing}",
    )


async def _fetch_then_release(
    fetcher: ChunkFetcher,
    layer: Layer,
    planned: PlannedRange[ChunkTag],
    off_link: _OffLink,
    in_memory: trio.Semaphore,
    place: BudgetPlace,
) -> None:
    try:
        await fetcher.flights.fetch_background(layer, planned, on_bytes=off_link)
    except Exception as exc:
        # The sweep at the end fetches whatever this range did not deliver.
        log.warning(
            "background range failed layer=%s start=%d length=%d error=%r",
            layer.layer_id,
            planned.start,
            planned.length,
            exc,
        )
    finally:
        off_link()
        in_memory.release()
        place.release()


class _OffLink:
    """Called when a background range's bytes are in (or it failed): its turn and its place on
    the link go to the next range. Once only, however often it is called."""

    __slots__ = ("_on_link", "_turn")

    def __init__(self, turn: BackgroundTurn, on_link: trio.Semaphore) -> None:
        self._turn = turn
        self._on_link: trio.Semaphore | None = on_link

    def __call__(self) -> None:
        self._turn.release()
        on_link, self._on_link = self._on_link, None
        if on_link is not None:
            on_link.release()


def cut_range(
    planned: PlannedRange[ChunkTag], max_bytes: int | None
) -> tuple[PlannedRange[ChunkTag], PlannedRange[ChunkTag] | None]:
    """The head of ``planned`` (chunks in blob order) spanning at most ``max_bytes``, at least
    its first chunk, and the rest (None when the head is all of it)."""
    if max_bytes is None or planned.length <= max_bytes:
        return planned, None
    chunks = sorted(planned.chunks, key=lambda chunk: chunk[1].blob_offset)
    first = chunks[0][1].blob_offset
    count = 1
    while count < len(chunks) and chunks[count][1].blob_end - first <= max_bytes:
        count += 1
    if count == len(chunks):
        return planned, None
    head = chunks[:count]
    head_end = max(ref.blob_end for _, ref in head)
    return (
        PlannedRange(first, head_end, tuple(head)),
        PlannedRange(chunks[count][1].blob_offset, planned.end, tuple(chunks[count:])),
    )


async def run_layer_background(fetcher: ChunkFetcher, layer: Layer, *, background: bool) -> None:
    """The per-layer task started by attach; failures are logged, never raised."""
    set_fetch_kind(BACKGROUND)
    try:
        if background:
            plan = await plan_layer(fetcher, layer)
            if plan.proves_blob:
                await fetch_missing(fetcher, layer, plan)
            else:
                hold_reader_bytes(fetcher, layer)
                await fetch_everything(fetcher, layer, plan)
        else:
            await prefetch(fetcher, layer)
    except Exception as exc:
        layer.stats.errors += 1
        layer.stats.last_error = f"background fetch: {type(exc).__name__}: {exc}"
        log.error(
            "background fetch stopped layer=%s digest=%s error=%r",
            layer.layer_id,
            layer.digest,
            exc,
        )


class _OrderedHasher:
    """Feeds ranges that finish in any order into the hash in blob order; ``slots`` bounds how
    many ranges (fetching or waiting for their turn) are held in memory."""

    def __init__(self, hasher: hashlib._Hash, concurrency: int) -> None:
        self._hasher = hasher
        self._next = 0
        self._waiting: dict[int, bytes] = {}
        self._lock = trio.Lock()
        self.slots = trio.Semaphore(concurrency)
        self.fetched = 0  # bytes requested from the blob for the check
        self.reused = 0  # bytes read back from readers' held copy instead

    async def feed(self, number: int, data: bytes) -> None:
        self._waiting[number] = data
        async with self._lock:
            while self._next in self._waiting:
                chunk = self._waiting.pop(self._next)
                if len(chunk) >= _HASH_OFF_THREAD:
                    await trio.to_thread.run_sync(self._hasher.update, chunk)
                else:
                    self._hasher.update(chunk)
                self._next += 1
                self.slots.release()


async def _fetch_and_hash(
    fetcher: ChunkFetcher,
    layer: Layer,
    planned: PlannedRange[ChunkTag],
    number: int,
    hashed: _OrderedHasher,
    *,
    on_bytes: Callable[[], None] | None = None,
) -> None:
    held = layer.held
    read = None
    if held is not None:

        async def read(start: int, end: int) -> bytes:
            # Only the gaps readers left are requested; held and fetched bytes are hashed
            # together in blob order below.
            assert held is not None
            data, reused = await held.read_with_gaps(start, end, fetch_gap)
            layer.stats.held_bytes_reused += reused
            hashed.reused += reused
            return data

        async def fetch_gap(start: int, end: int) -> bytes:
            data = await fetcher.flights.request_bytes(layer, start, end - start)
            hashed.fetched += len(data)
            return data

    raw = await fetcher.flights.fetch_background(layer, planned, read=read, on_bytes=on_bytes)
    if read is None:
        hashed.fetched += planned.length + lead_bytes(layer.index, planned.start)
    await hashed.feed(number, raw)
