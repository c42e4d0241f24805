"""Counters of the filesystem, kept cheap enough for every READ and read out by the daemon.

Recording is a few integer additions on the trio thread: no lock, no label lookup. A reader of
these counters (the daemon's Prometheus collector) takes a ``snapshot`` on the trio thread too,
so it never sees a half-made update.

Histograms have fixed bucket bounds; ``observe`` is a bisect and two additions.

Fetched bytes are counted by kind: ``on_demand`` for everything a reader's read started (its
miss, readahead, file completion, directory fetch), ``prefetch`` for the landmark range fetched
on attach, ``background`` for the rest of the blob. The kind travels in a context variable, which
trio copies into every task a task starts, so the fetch tasks of a reader inherit its kind.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from fusefs.cache import CacheUsage

ON_DEMAND = "on_demand"
PREFETCH = "prefetch"
BACKGROUND = "background"
FETCH_KINDS = (ON_DEMAND, PREFETCH, BACKGROUND)
# Reads of a layer's index (footer, TOC, zTOC) while it is opened. They go around the chunk
# flights, so no meter counts them; traces show them as their own kind.
INDEX = "index"

_fetch_kind: ContextVar[str] = ContextVar("lazysnap_fetch_kind", default=ON_DEMAND)

# Bucket upper bounds. Reads answered from memory take tens of microseconds, a miss on a far
# registry hundreds of milliseconds; attach and background fetch take seconds to minutes. Few
# buckets: every bucket is a line per layer in each scrape.
MICROSECOND_BOUNDS = (50.0, 100.0, 500.0, 1e3, 5e3, 1e4, 5e4, 1e5, 5e5, 1e6)
MILLISECOND_BOUNDS = (5.0, 10.0, 50.0, 100.0, 500.0, 1e3, 5e3, 1e4, 6e4, 3e5)


@contextmanager
def fetch_kind(kind: str) -> Iterator[None]:
    """Count the fetches of this task, and of the tasks it starts, as ``kind``."""
    token = _fetch_kind.set(kind)
    try:
        yield
    finally:
        _fetch_kind.reset(token)


def set_fetch_kind(kind: str) -> None:
    """Count the rest of this task's fetches as ``kind`` (for a task that does only that)."""
    _fetch_kind.set(kind)


def current_fetch_kind() -> str:
    """The kind this task's fetches count as (traces label their ranges with it)."""
    return _fetch_kind.get()


class Histogram:
    """Counts per bucket, with the sum; ``bounds`` are the upper bounds, +Inf implied."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.total += other.total

    def copy(self) -> Histogram:
        copied = Histogram.__new__(Histogram)
        copied.bounds = self.bounds
        copied.counts = self.counts.copy()
        copied.total = self.total
        return copied

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +Inf, as Prometheus wants."""
        running = 0
        out: list[tuple[float, int]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class LayerMeters:
    """What one layer served and fetched; ``LayerStats.meters``."""

    reads: int = 0
    served_bytes: int = 0
    read_micros: Histogram = field(default_factory=lambda: Histogram(MICROSECOND_BOUNDS))
    fetches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FETCH_KINDS, 0))
    fetched_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FETCH_KINDS, 0))
    registry_get_millis: Histogram = field(
        default_factory=lambda: Histogram(MILLISECOND_BOUNDS)
    )
    background_millis: Histogram = field(default_factory=lambda: Histogram(MILLISECOND_BOUNDS))
    # Filled in by the daemon, which attaches layers: the Prepare's attach and its TOC read.
    mount_millis: Histogram = field(default_factory=lambda: Histogram(MILLISECOND_BOUNDS))
    toc_get_millis: Histogram = field(default_factory=lambda: Histogram(MILLISECOND_BOUNDS))
    readdir_micros: Histogram = field(default_factory=lambda: Histogram(MICROSECOND_BOUNDS))
    chunk_verify_failures: int = 0  # taken from ``LayerStats.verify_failures`` when read out
    blob_verify_failures: int = 0

    def served(self, size: int, seconds: float) -> None:
        """One READ answered with ``size`` bytes after ``seconds``."""
        self.reads += 1
        self.served_bytes += size
        self.read_micros.observe(seconds * 1e6)

    def fetched(self, size: int, seconds: float) -> None:
        """One ranged read of ``size`` bytes from the blob that took ``seconds``."""
        kind = _fetch_kind.get()
        self.fetches[kind] += 1
        self.fetched_bytes[kind] += size
        self.registry_get_millis.observe(seconds * 1e3)

    def add(self, other: LayerMeters) -> None:
        self.reads += other.reads
        self.served_bytes += other.served_bytes
        self.read_micros.add(other.read_micros)
        self.readdir_micros.add(other.readdir_micros)
        for kind in FETCH_KINDS:
            self.fetches[kind] += other.fetches[kind]
            self.fetched_bytes[kind] += other.fetched_bytes[kind]
        self.registry_get_millis.add(other.registry_get_millis)
        self.background_millis.add(other.background_millis)
        self.mount_millis.add(other.mount_millis)
        self.toc_get_millis.add(other.toc_get_millis)
        self.chunk_verify_failures += other.chunk_verify_failures
        self.blob_verify_failures += other.blob_verify_failures

    def copy(self) -> LayerMeters:
        """A copy taken without loops over buckets: it runs on the trio thread per scrape."""
        return LayerMeters(
            reads=self.reads,
            served_bytes=self.served_bytes,
            read_micros=self.read_micros.copy(),
            fetches=self.fetches.copy(),
            fetched_bytes=self.fetched_bytes.copy(),
            registry_get_millis=self.registry_get_millis.copy(),
            background_millis=self.background_millis.copy(),
            mount_millis=self.mount_millis.copy(),
            toc_get_millis=self.toc_get_millis.copy(),
            readdir_micros=self.readdir_micros.copy(),
            chunk_verify_failures=self.chunk_verify_failures,
            blob_verify_failures=self.blob_verify_failures,
        )


@dataclass(frozen=True, slots=True)
class LayerSnapshot:
    """One attached layer's counters at one moment."""

    layer_id: str
    digest: str
    size: int
    prefetch_size: int
    meters: LayerMeters


@dataclass(frozen=True, slots=True)
class FsSnapshot:
    """The filesystem's counters at one moment: ``LazyFilesystem.snapshot()``."""

    layers: list[LayerSnapshot]
    # Meters of the layers detached since start, so that totals without a layer label never
    # go down when a layer goes.
    retired: LayerMeters
    takeovers: int  # 1 when this process serves a connection taken over from the keeper
    lost_requests_answered: int  # requests of the dead predecessor answered EINTR
    cache: CacheUsage | None
    index_build_failures: int = 0  # layers answered whose index then failed to build
