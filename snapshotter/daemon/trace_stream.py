"""The daemon's side of ``Daemon/Trace``: one recording, as a stream of timed events.

It runs on the gRPC thread of the call; ``grpc_service`` turns the events into protobuf. The
trio thread only puts events into the recording's queue, so streaming never hops into trio and
a slow client never holds the filesystem.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from fusefs import FileRead, RangeRead, Recording, TraceHub

POLL_SECONDS = 0.25  # how often a quiet stream checks that its client is still there
# Each stream holds one of the daemon's gRPC threads; the others stay for containerd.
MAX_RECORDINGS = 4


class TooManyRecordings(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Started:
    unix_time: float


@dataclass(frozen=True, slots=True)
class Timed:
    seconds: float  # since the recording began: when the event began
    dropped: int  # events dropped so far
    event: Started | FileRead | RangeRead


def stream_trace(
    hub: TraceHub,
    duration: float,
    client_waiting: Callable[[], bool],
    open_recordings: list[Recording],
) -> Generator[Timed, None, None]:
    """``Started``, then events until ``duration`` seconds passed (0: until the client goes
    away). ``open_recordings`` is shared by the calls of one servicer, to bound them."""
    if len(open_recordings) >= MAX_RECORDINGS:
        raise TooManyRecordings(f"{MAX_RECORDINGS} traces are being recorded already")
    recording = hub.start()
    open_recordings.append(recording)
    try:
        yield Timed(0.0, 0, Started(recording.started_unix))
        ends = recording.started + duration if duration > 0 else None
        while client_waiting():
            wait = POLL_SECONDS if ends is None else min(POLL_SECONDS, ends - time.monotonic())
            if wait <= 0:
                break
            event = recording.get(wait)
            if event is not None:
                yield _timed(event, recording)
        # Events recorded before the window closed still go out.
        while (event := recording.get(0)) is not None:
            yield _timed(event, recording)
    finally:
        hub.stop(recording)
        open_recordings.remove(recording)


def _timed(event: FileRead | RangeRead, recording: Recording) -> Timed:
    return Timed(event.at - recording.started, recording.dropped, event)
