"""``lazysnap trace record``: stream the daemon's trace events into a JSON lines file.

The window is a duration, or the run of a command: the command starts only once the daemon
said recording began, so its first reads are in the trace.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.errors import SnapshotterError

# After the command exits: events of its last reads may still be on their way. Wait until the
# stream was quiet this long, but not longer than SETTLE_LIMIT (background fetch never stops).
SETTLE_QUIET = 0.5
SETTLE_LIMIT = 3.0
START_TIMEOUT = 10.0  # for the daemon's first event


class TraceUnavailable(SnapshotterError):
    """The daemon cannot trace: an older daemon, one without lazy layers, or none at all."""


def event_record(event: daemon_pb2.TraceEvent) -> dict[str, Any] | None:
    """One JSON line for a read or a range; None for other events."""
    which = event.WhichOneof("event")
    seconds = round(event.seconds, 6)
    if which == "read":
        read = event.read
        line: dict[str, Any] = {
            "type": "read", "time": seconds, "layer": read.layer, "digest": read.digest,
            "path": read.path, "offset": read.offset, "size": read.size,
            "file_size": read.file_size, "wait": round(read.wait_seconds, 6),
        }
        if read.error:
            line["error"] = read.error
        return line
    if which == "range":
        fetched = event.range
        line = {
            "type": "range", "time": seconds, "digest": fetched.digest, "start": fetched.start,
            "end": fetched.end, "bytes": fetched.end - fetched.start, "kind": fetched.kind,
            "duration": round(fetched.duration_seconds, 6),
        }
        if fetched.error:
            line["error"] = fetched.error
        return line
    return None


def explain(exc: grpc.RpcError, address: str) -> TraceUnavailable:
    detail = (exc.details() or "") if isinstance(exc, grpc.Call) else str(exc)
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return TraceUnavailable(
            f"the daemon at {address} cannot trace: it is older than this lazysnap; "
            "restart it with this version"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return TraceUnavailable(f"no lazysnap daemon answers at {address}: {detail}")
    return TraceUnavailable(f"the daemon at {address} cannot trace: {detail}")


@dataclass(slots=True)
class _Writer:
    out: TextIO
    events: int = 0
    dropped: int = 0
    last_seconds: float = 0.0
    last_arrival: float = 0.0

    def line(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def event(self, event: daemon_pb2.TraceEvent) -> None:
        self.last_arrival = time.monotonic()
        self.dropped = max(self.dropped, event.dropped)
        self.last_seconds = max(self.last_seconds, event.seconds)
        record = event_record(event)
        if record is not None:
            self.line(record)
            self.events += 1


def record(
    address: str, out: TextIO, *, duration: float = 0.0, command: Sequence[str] = ()
) -> int:
    """Record into ``out``; the command's exit status, else 0. Ctrl-C ends a timeless window."""
    with grpc.insecure_channel(f"unix:{address}") as channel:
        call = daemon_pb2_grpc.DaemonStub(channel).Trace(
            daemon_pb2.TraceRequest(duration_seconds=0.0 if command else duration)
        )
        events: Iterator[daemon_pb2.TraceEvent] = call
        try:
            first = _first_event(call, events)
        except grpc.RpcError as exc:
            raise explain(exc, address) from None
        writer = _Writer(out, last_arrival=time.monotonic())
        window: dict[str, Any] = {"command": list(command)} if command else {"duration": duration}
        writer.line({
            "type": "start", "unix_time": first.started.unix_time,
            "daemon_pid": first.started.pid, "daemon_version": first.started.version, **window,
        })
        exit_code: int | None = None
        if command:
            exit_code = _record_command(call, events, writer, command)
        else:
            try:
                _drain(events, writer)
            except KeyboardInterrupt:
                call.cancel()
        end: dict[str, Any] = {
            "type": "end", "time": round(writer.last_seconds, 6), "events": writer.events,
            "dropped": writer.dropped,
        }
        if exit_code is not None:
            end["exit_code"] = exit_code
        writer.line(end)
        out.flush()
    return exit_code or 0


def _first_event(call: Any, events: Iterator[daemon_pb2.TraceEvent]) -> daemon_pb2.TraceEvent:
    timer = threading.Timer(START_TIMEOUT, call.cancel)
    timer.start()
    try:
        first = next(events, None)
    except grpc.RpcError:
        if timer.finished.is_set():  # it fired: the cancel was ours
            raise TraceUnavailable(
                f"the daemon did not begin recording within {START_TIMEOUT:g} s"
            ) from None
        raise
    finally:
        timer.cancel()
    if first is None or first.WhichOneof("event") != "started":
        raise TraceUnavailable("the daemon's trace stream did not begin with its start")
    return first


def _drain(events: Iterator[daemon_pb2.TraceEvent], writer: _Writer) -> None:
    try:
        for event in events:
            writer.event(event)
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.CANCELLED:
            return  # we ended the window
        raise


def _record_command(
    call: Any, events: Iterator[daemon_pb2.TraceEvent], writer: _Writer, command: Sequence[str]
) -> int:
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            _drain(events, writer)
        except BaseException as exc:
            failure.append(exc)

    reader = threading.Thread(target=drain, name="trace-reader", daemon=True)
    reader.start()
    try:
        exit_code = subprocess.run(list(command), check=False).returncode
        settle_end = time.monotonic() + SETTLE_LIMIT
        while time.monotonic() < settle_end and reader.is_alive():
            if time.monotonic() - writer.last_arrival >= SETTLE_QUIET:
                break
            time.sleep(0.05)
    finally:
        call.cancel()
        reader.join()
    if failure:
        raise failure[0]
    return exit_code
