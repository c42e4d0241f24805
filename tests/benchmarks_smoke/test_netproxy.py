"""benchmarks/netproxy.py relays bytes intact, counts them, and roughly applies its link model.

Loopback only and fast. Timing checks are generous sanity bounds (the machine is shared), never
benchmarks: a limited link must be clearly slower than loopback, not exactly as slow as asked.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

NETPROXY_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "netproxy.py"


def _load_netproxy() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("lazysnap_bench_netproxy", NETPROXY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


netproxy = _load_netproxy()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = bytearray()

        def reader() -> None:
            while len(received) < len(payload):
                data = sock.recv(65536)
                if not data:
                    break
                received.extend(data)

        thread = threading.Thread(target=reader)
        thread.start()
        sock.sendall(payload)
        thread.join(timeout=10)
        return bytes(received)


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)


def test_relays_bytes_intact_and_counts_them(echo_port: int) -> None:
    payload = os.urandom(1 << 20)
    with netproxy.LinkProxy(("127.0.0.1", echo_port), lifetime=30) as proxy:
        assert _echo_through(proxy.port, payload) == payload
        assert _echo_through(proxy.port, b"second") == b"second"
        # The down counter moves when the last chunk is handed over; give it a moment.
        _wait_for(lambda: proxy.counters().bytes_down == len(payload) + 6)
        counters = proxy.counters()
    assert counters.connections == 2
    assert counters.bytes_up == len(payload) + 6
    assert counters.bytes_down == len(payload) + 6


def test_counts_http_requests_and_ranges(echo_port: int) -> None:
    requests = (
        b"GET /v2/a/blobs/sha256:1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
        b"HEAD /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v2/a/blobs/sha256:2 HTTP/1.1\r\nhost: x\r\nrange: bytes=5-\r\n\r\n"
    )
    with netproxy.LinkProxy(("127.0.0.1", echo_port), lifetime=30) as proxy:
        before = proxy.counters()
        since = time.monotonic()
        assert _echo_through(proxy.port, requests) == requests
        delta = proxy.counters().minus(before)
        logged = proxy.requests_since(since)
    assert [(r.method, r.path, r.start, r.end) for r in logged] == [
        ("GET", "/v2/a/blobs/sha256:1", 0, 9),
        ("HEAD", "/v2/", -1, -1),
        ("GET", "/v2/a/blobs/sha256:2", 5, -1),
    ]
    assert delta.http_requests == 3
    assert delta.range_requests == 2
    assert delta.range_bytes == 10  # bytes=0-9; an open-ended range has no length to add


def test_limits_are_roughly_applied(echo_port: int) -> None:
    with netproxy.LinkProxy(("127.0.0.1", echo_port), mbit=40, rtt_ms=40, lifetime=30) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(3):
                started = time.perf_counter()
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                rtts.append(time.perf_counter() - started)
        # 40 ms asked; loopback alone is well under 1 ms.
        assert 0.025 < min(rtts) < 2.0

        # Two connections share one 40 Mbit/s link: 2 x 512 KiB echoed is 1 MiB each way,
        # at least ~0.21 s however the connections interleave.
        payload = os.urandom(512 * 1024)
        results: list[bytes] = []
        started = time.perf_counter()
        threads = [
            threading.Thread(target=lambda: results.append(_echo_through(proxy.port, payload)))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        elapsed = time.perf_counter() - started
    assert results == [payload, payload]
    assert 0.15 < elapsed < 8.0


def test_stops_by_itself_after_its_lifetime(echo_port: int) -> None:
    proxy = netproxy.LinkProxy(("127.0.0.1", echo_port), lifetime=0.5)
    port = proxy.start()
    try:
        assert _echo_through(port, b"alive") == b"alive"
        assert proxy._thread is not None
        proxy._thread.join(timeout=5)
        assert not proxy._thread.is_alive()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proxy.stop()


def test_selfcheck_reports_the_link() -> None:
    result = netproxy.selfcheck(mbit=0, rtt_ms=0, megabytes=2, pings=3)
    assert result["bulk_bytes"] == 2_000_000
    # Down: the bulk payload and the three echoed pings; up: two command bytes and the pings.
    assert result["counted_down"] == 2_000_000 + 3
    assert result["counted_up"] == 2 + 3
