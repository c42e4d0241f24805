"""Tracing for experiments: each first read of a file and each range read from a blob.

Nothing is recorded while nobody records: every hook first tests ``TRACE.active``, a plain
attribute. A recorder (``lazysnap trace record``, through the daemon) calls ``TRACE.start()``
and drains its ``Recording`` from another thread. Each recording has a bounded queue of its own;
when it is full, events are dropped and counted, so a slow recorder never slows a read.

One hub serves the whole process, because the hooks sit in places that know a layer or a blob
but not the filesystem they belong to, and a process serves one lazy mount.

The kind of a range is that of the task that asked for it, a context variable: ``on-demand``
unless the task said otherwise (``fusefs.stats.fetch_kind``, the kind the meters count by too).
Trio gives each task a copy of its parent's context, so a kind set in a background task stays in
that task and its children.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from fusefs.blob import BlobReader
from fusefs.layer import Layer
from fusefs.stats import (
    BACKGROUND,
    INDEX,
    ON_DEMAND,
    PREFETCH,
    current_fetch_kind,
    fetch_kind,
)

FetchKind = Literal["on-demand", "prefetch", "background", "index"]
FETCH_KINDS: tuple[FetchKind, ...] = ("on-demand", "prefetch", "background", "index")
DEFAULT_CAPACITY = 100_000  # events a recording holds before it drops

# The meters' names for the kinds, as traces spell them.
_TRACE_KINDS: dict[str, FetchKind] = {
    ON_DEMAND: "on-demand", PREFETCH: "prefetch", BACKGROUND: "background", INDEX: "index",
}


@dataclass(frozen=True, slots=True)
class FileRead:
    """The first read of a file during a recording. ``at`` is ``time.monotonic()``."""

    at: float
    layer: str
    digest: str
    path: str
    offset: int
    size: int
    file_size: int
    wait: float  # seconds until the read was answered
    error: str  # the exception's type name, empty when the read was answered


@dataclass(frozen=True, slots=True)
class RangeRead:
    """One range read from a blob: a registry request for a remote blob."""

    at: float
    digest: str
    start: int
    end: int
    kind: FetchKind
    duration: float
    error: str

    @property
    def length(self) -> int:
        return self.end - self.start


TraceEvent = FileRead | RangeRead


class Recording:
    """The events of one recorder, from ``TRACE.start()`` until ``TRACE.stop()``."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.started = time.monotonic()
        self.started_unix = time.time()
        self.dropped = 0
        self._events: queue.Queue[TraceEvent] = queue.Queue(capacity)
        self._seen: set[tuple[str, int]] = set()

    def first_read(self, layer: str, entry: int) -> bool:
        """True the first time this recording sees ``entry`` of ``layer`` read."""
        key = (layer, entry)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def put(self, event: TraceEvent) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float) -> TraceEvent | None:
        """The next event, waiting at most ``timeout`` seconds; None if there was none."""
        try:
            return self._events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None


class TraceHub:
    """Hands events to every open recording; does nothing while there is none."""

    def __init__(self) -> None:
        self.active = False
        # Replaced, never changed in place: the trio thread iterates it while a gRPC thread
        # starts or stops a recording.
        self._recordings: tuple[Recording, ...] = ()

    def start(self, capacity: int = DEFAULT_CAPACITY) -> Recording:
        recording = Recording(capacity)
        self._recordings = (*self._recordings, recording)
        self.active = True
        return recording

    def stop(self, recording: Recording) -> None:
        self._recordings = tuple(r for r in self._recordings if r is not recording)
        self.active = bool(self._recordings)

    async def read(
        self, layer: Layer, entry: int, offset: int, size: int,
        answer: Callable[[], Awaitable[bytes]],
    ) -> bytes:
        """``answer()``, timed when this is the first read of the file for some recording."""
        firsts = [r for r in self._recordings if r.first_read(layer.layer_id, entry)]
        if not firsts:
            return await answer()
        started = time.monotonic()
        error = ""
        try:
            return await answer()
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            event = FileRead(
                at=started, layer=layer.layer_id, digest=layer.digest,
                path=layer.index.path(entry), offset=offset, size=size,
                file_size=layer.index.attr(entry).size,
                wait=time.monotonic() - started, error=error,
            )
            for recording in firsts:
                recording.put(event)

    async def read_at(self, blob: BlobReader, offset: int, length: int) -> bytes:
        """``blob.read_at(offset, length)``, recorded while someone records."""
        if not self.active:
            return await blob.read_at(offset, length)
        started = time.monotonic()
        error = ""
        try:
            return await blob.read_at(offset, length)
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            event = RangeRead(
                at=started, digest=blob.digest, start=offset, end=offset + length,
                kind=_TRACE_KINDS.get(current_fetch_kind(), "on-demand"),
                duration=time.monotonic() - started, error=error,
            )
            for recording in self._recordings:
                recording.put(event)


TRACE = TraceHub()


class IndexReadBlob:
    """A blob whose reads are recorded as kind ``index``: for reading a layer's TOC."""

    def __init__(self, blob: BlobReader) -> None:
        self._blob = blob

    @property
    def size(self) -> int:
        return self._blob.size

    @property
    def digest(self) -> str:
        return self._blob.digest

    async def read_at(self, offset: int, length: int) -> bytes:
        if not TRACE.active:
            return await self._blob.read_at(offset, length)
        with fetch_kind(INDEX):
            return await TRACE.read_at(self._blob, offset, length)
