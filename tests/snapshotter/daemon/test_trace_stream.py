"""``Daemon/Trace`` over a real gRPC socket, and ``lazysnap trace record``'s side of it."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from fusefs import TraceHub
from snapshotter._proto import daemon_pb2_grpc
from snapshotter.client.trace_recorder import TraceUnavailable, record
from snapshotter.daemon.grpc_service import DaemonServicer
from snapshotter.daemon.trace_stream import (
    MAX_RECORDINGS,
    Started,
    TooManyRecordings,
    stream_trace,
)
from tests.integration.fuse_support import FakeBlob


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def start(servicer: object) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        daemon_pb2_grpc.add_DaemonServicer_to_server(servicer, server)
        address = str(tmp_path / f"d{len(servers)}.sock")
        server.add_insecure_port(f"unix:{address}")
        server.start()
        servers.append(server)
        return address

    yield start
    for server in servers:
        server.stop(None).wait()


def fetch_when_recording(hub: TraceHub, ranges: list[tuple[int, int]]) -> threading.Thread:
    """Read ``ranges`` of a blob through ``hub`` as soon as someone records."""
    blob = FakeBlob(bytes(1000), digest="sha256:" + "ab" * 32)

    async def fetch() -> None:
        for offset, length in ranges:
            await hub.read_at(blob, offset, length)

    def run() -> None:
        deadline = time.monotonic() + 10
        while not hub.active and time.monotonic() < deadline:
            time.sleep(0.01)
        trio.run(fetch)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_timed_window_records_the_ranges_read_in_it(serve: Any) -> None:
    hub = TraceHub()
    address = serve(DaemonServicer(None, trace=hub))  # type: ignore[arg-type]
    fetching = fetch_when_recording(hub, [(0, 100), (500, 20)])
    out = io.StringIO()
    assert record(address, out, duration=1.0) == 0
    fetching.join()
    written = lines(out)
    assert written[0]["type"] == "start" and written[0]["duration"] == 1.0
    ranges = [line for line in written if line["type"] == "range"]
    assert [(r["start"], r["end"], r["bytes"], r["kind"]) for r in ranges] == [
        (0, 100, 100, "on-demand"), (500, 520, 20, "on-demand")
    ]
    assert all(r["digest"] == "sha256:" + "ab" * 32 and r["duration"] >= 0 for r in ranges)
    assert written[-1]["type"] == "end"
    assert (written[-1]["events"], written[-1]["dropped"]) == (2, 0)
    assert not hub.active  # the window closed: tracing is off again


def test_a_command_window_returns_the_command_status(serve: Any) -> None:
    hub = TraceHub()
    address = serve(DaemonServicer(None, trace=hub))  # type: ignore[arg-type]
    fetching = fetch_when_recording(hub, [(0, 10)])
    out = io.StringIO()
    command = [sys.executable, "-c", "import time, sys; time.sleep(0.3); sys.exit(3)"]
    assert record(address, out, command=command) == 3
    fetching.join()
    written = lines(out)
    assert written[0]["command"] == command
    assert [line["type"] for line in written] == ["start", "range", "end"]
    assert written[-1]["exit_code"] == 3
    deadline = time.monotonic() + 5
    while hub.active and time.monotonic() < deadline:  # the daemon sees the cancel shortly after
        time.sleep(0.01)
    assert not hub.active


def test_a_daemon_without_lazy_layers_says_so(serve: Any) -> None:
    address = serve(DaemonServicer(None))  # type: ignore[arg-type]
    with pytest.raises(TraceUnavailable, match="serves no lazy layers"):
        record(address, io.StringIO(), duration=1.0)


def test_an_old_daemon_is_told_apart(serve: Any) -> None:
    address = serve(daemon_pb2_grpc.DaemonServicer())  # the generated base: no Trace
    with pytest.raises(TraceUnavailable, match="older than this lazysnap"):
        record(address, io.StringIO(), duration=1.0)


def test_no_daemon_at_all(tmp_path: Path) -> None:
    with pytest.raises(TraceUnavailable, match="no lazysnap daemon answers"):
        record(str(tmp_path / "none.sock"), io.StringIO(), duration=1.0)


def test_recordings_are_bounded_and_released() -> None:
    hub = TraceHub()
    open_recordings: list[Any] = []
    streams = [stream_trace(hub, 0, lambda: True, open_recordings) for _ in range(MAX_RECORDINGS)]
    for stream in streams:
        assert isinstance(next(stream).event, Started)
    with pytest.raises(TooManyRecordings):
        next(stream_trace(hub, 0, lambda: True, open_recordings))
    for stream in streams:
        stream.close()
    assert open_recordings == [] and not hub.active


def test_sigterm_ends_a_recording_with_its_end_line(serve: Any, tmp_path: Path) -> None:
    """A recorder started in the background, where SIGINT is ignored, is stopped with SIGTERM
    and must still close its file properly: before, SIGTERM killed it and left no end line."""
    import subprocess  # noqa: PLC0415

    hub = TraceHub()
    address = serve(DaemonServicer(None, trace=hub))  # type: ignore[arg-type]
    output = tmp_path / "t.jsonl"
    recorder = subprocess.Popen(
        [sys.executable, "-m", "snapshotter.cli", "trace", "record", "--address", address,
         "--output", str(output)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (output.exists() and output.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert output.read_text().startswith('{"type": "start"')  # written at once
        fetch_when_recording(hub, [(0, 10)]).join()
        while '"range"' not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)  # stopping drops what is still on its way: wait until it is here
        recorder.terminate()
        _, errors = recorder.communicate(timeout=30)
        assert recorder.returncode == 0, errors
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.communicate()
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["type"] for line in written] == ["start", "range", "end"]


class _SilentDaemon(daemon_pb2_grpc.DaemonServicer):  # type: ignore[misc]
    """Accepts Trace and never sends a first event."""

    def Trace(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        while context.is_active():
            time.sleep(0.05)
        yield from ()


def test_a_daemon_that_never_starts_recording(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import snapshotter.client.trace_recorder as recorder  # noqa: PLC0415

    monkeypatch.setattr(recorder, "START_TIMEOUT", 0.5)
    address = serve(_SilentDaemon())
    with pytest.raises(TraceUnavailable, match=r"did not begin recording within 0\.5 s"):
        record(address, io.StringIO(), duration=1.0)
