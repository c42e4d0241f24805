"""The daemon's side of ``Daemon/Trace``: one recording, streamed as protobuf events.

It runs on the gRPC thread of the call. The trio thread only puts events into the recording's
queue, so streaming never hops into trio and a slow client never holds the filesystem.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator

from fusefs import FileRead, RangeRead, Recording, TraceHub
from snapshotter._proto import daemon_pb2
from snapshotter.version import VERSION

POLL_SECONDS = 0.25  # how often a quiet stream checks that its client is still there
# Each stream holds one of the daemon's gRPC threads; the others stay for containerd.
MAX_RECORDINGS = 4


class TooManyRecordings(Exception):
    pass


def stream_trace(
    hub: TraceHub,
    duration: float,
    client_waiting: Callable[[], bool],
    open_recordings: list[Recording],
) -> Generator[daemon_pb2.TraceEvent, None, None]:
    """Events from now until ``duration`` seconds passed (0: until the client goes away).

    ``open_recordings`` is shared by the calls of one servicer, to bound them."""
    if len(open_recordings) >= MAX_RECORDINGS:
        raise TooManyRecordings(f"{MAX_RECORDINGS} traces are being recorded already")
    recording = hub.start()
    open_recordings.append(recording)
    try:
        yield daemon_pb2.TraceEvent(
            seconds=0.0,
            started=daemon_pb2.TraceStarted(
                unix_time=recording.started_unix, pid=os.getpid(), version=VERSION
            ),
        )
        ends = recording.started + duration if duration > 0 else None
        while client_waiting():
            wait = POLL_SECONDS if ends is None else min(POLL_SECONDS, ends - time.monotonic())
            if wait <= 0:
                break
            event = recording.get(wait)
            if event is not None:
                yield to_proto(event, recording)
        # Events recorded before the window closed still go out.
        while (event := recording.get(0)) is not None:
            yield to_proto(event, recording)
    finally:
        hub.stop(recording)
        open_recordings.remove(recording)


def to_proto(event: FileRead | RangeRead, recording: Recording) -> daemon_pb2.TraceEvent:
    seconds = event.at - recording.started
    if isinstance(event, FileRead):
        return daemon_pb2.TraceEvent(
            seconds=seconds,
            dropped=recording.dropped,
            read=daemon_pb2.TraceFileRead(
                layer=event.layer, digest=event.digest, path=event.path, offset=event.offset,
                size=event.size, file_size=event.file_size, wait_seconds=event.wait,
                error=event.error,
            ),
        )
    return daemon_pb2.TraceEvent(
        seconds=seconds,
        dropped=recording.dropped,
        range=daemon_pb2.TraceRange(
            digest=event.digest, start=event.start, end=event.end, kind=event.kind,
            duration_seconds=event.duration, error=event.error,
        ),
    )
