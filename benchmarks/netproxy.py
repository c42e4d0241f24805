#!/usr/bin/env python3
"""A loopback TCP proxy that behaves like a slow link: shared bandwidth and one-way delay.

Every connection through the proxy shares ONE link: a FIFO serialiser per direction models the
bottleneck (``--mbit``; the uplink and the downlink are limited separately, like a full-duplex
link), then each chunk is delivered ``rtt/2`` after it left the serialiser. A bulk transfer
therefore runs at the link rate (the delay is pipelined, not added per chunk), while a request
and its answer pay the full RTT, as on a real path. Bytes are counted per direction, and HTTP
request lines and ``Range`` headers seen going upstream are counted too (a heuristic: a header
split across two reads is missed; the benchmark only uses it to report request counts).

Use it as a module::

    with LinkProxy(("127.0.0.1", 5000), mbit=100, rtt_ms=20, lifetime=600) as proxy:
        port = proxy.port               # connect to 127.0.0.1:port
        ...
        print(proxy.counters())

or standalone::

    python benchmarks/netproxy.py serve --upstream 127.0.0.1:5000 --mbit 100 --rtt-ms 20
    python benchmarks/netproxy.py selfcheck --mbit 100 --rtt-ms 20

The proxy stops by itself after ``lifetime`` seconds (it is a benchmark tool, never a service).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

# Small reads keep the model close to a packet link when limited (a 16 KiB chunk takes 1.3 ms
# at 100 Mbit/s); unlimited, large reads keep Python's per-chunk cost off the throughput.
LIMITED_READ = 16 * 1024
UNLIMITED_READ = 256 * 1024
SLACK_S = 0.010
QUEUE_CHUNKS = 4096  # per direction of a connection; the serialiser bounds it in practice
DEFAULT_LIFETIME = 3600.0

_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(?:GET|HEAD|POST|PUT|PATCH|DELETE) \S+ HTTP/1\.[01]\r\n")
_REQUEST = re.compile(
    rb"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n(.*?)\r\n\r\n", re.DOTALL
)
REQUEST_LOG_LIMIT = 100_000
_RANGE_HEADER = re.compile(rb"\r\nrange: *bytes=(\d*)-(\d*)", re.IGNORECASE)


@dataclass(frozen=True)
class Request:
    """An HTTP request seen going upstream (``start``/``end`` from its Range header, or -1)."""

    at: float  # time.monotonic() when the proxy read it
    connection: int
    method: str
    path: str
    start: int = -1
    end: int = -1


@dataclass(frozen=True)
class Counters:
    connections: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    http_requests: int = 0
    range_requests: int = 0
    range_bytes: int = 0  # sum of the lengths the Range headers asked for (bytes=a-b only)

    def minus(self, earlier: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(
            dataclasses.astuple(self), dataclasses.astuple(earlier), strict=True)))


class _Counting:
    """Mutable counters; only the proxy's trio thread writes, readers take a snapshot."""

    def __init__(self) -> None:
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.http_requests = 0
        self.range_requests = 0
        self.range_bytes = 0
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(self.connections, self.bytes_up, self.bytes_down,
                            self.http_requests, self.range_requests, self.range_bytes)

    def record(self, request: Request) -> None:
        with self._lock:
            if len(self.requests) < REQUEST_LOG_LIMIT:
                self.requests.append(request)

    def requests_since(self, since: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.at >= since]

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class _Serialiser:
    """The bottleneck of one direction, shared by every connection: chunks leave it one after
    another at ``bytes_per_s``. FIFO in the order the readers arrive (trio is single threaded,
    so the bookkeeping needs no lock)."""

    def __init__(self, bytes_per_s: float) -> None:
        self._rate = bytes_per_s
        self._free_at = -math.inf

    async def transmit(self, size: int) -> float:
        """Wait until ``size`` bytes have crossed the bottleneck; return that moment."""
        now = trio.current_time()
        if self._rate <= 0:
            return now
        # A token bucket of SLACK_S depth: a reader woken late by the scheduler may catch up,
        # so timer granularity does not eat bandwidth; an idle link never banks more than that.
        start = max(now - SLACK_S, self._free_at)
        self._free_at = start + size / self._rate
        await trio.sleep_until(self._free_at)
        # Not ``_free_at``: with the slack it may lie in the past, and the delay counts from
        # the moment the bytes really left.
        return trio.current_time()


@dataclass
class LinkModel:
    mbit: float = 0.0  # 0: unlimited
    rtt_ms: float = 0.0

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    @property
    def bytes_per_s(self) -> float:
        return self.mbit * 1e6 / 8


async def _pump(
    source: trio.SocketStream,
    dest: trio.SocketStream,
    serialiser: _Serialiser,
    delay: float,
    read_size: int,
    count: Callable[[bytes], None],
) -> None:
    """One direction of one connection: read, cross the bottleneck, deliver ``delay`` later."""
    send, receive = trio.open_memory_channel[tuple[float, bytes] | None](QUEUE_CHUNKS)

    async def deliver() -> None:
        async with receive:
            async for item in receive:
                if item is None:
                    break
                due, data = item
                await trio.sleep_until(due)
                await dest.send_all(data)
        # The source closed its side: pass the half-close on (HTTP keeps the other direction).
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await dest.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        async with send:
            while True:
                try:
                    data = await source.receive_some(read_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                if not data:
                    await send.send(None)
                    break
                count(data)
                left = await serialiser.transmit(len(data))
                await send.send((left + delay, data))


class _Link:
    def __init__(self, model: LinkModel, counting: _Counting) -> None:
        self.model = model
        self.counting = counting
        self.up = _Serialiser(model.bytes_per_s)
        self.down = _Serialiser(model.bytes_per_s)
        self.read_size = LIMITED_READ if model.mbit > 0 else UNLIMITED_READ
        self.connection_ids = 0

    def count_up(self, data: bytes, connection: int) -> None:
        ranges = _RANGE_HEADER.findall(data)
        now = time.monotonic()
        for method, path, headers in _REQUEST.findall(data):
            found = _RANGE_HEADER.search(b"\r\n" + headers)
            start, end = (int(found[1] or -1), int(found[2] or -1)) if found else (-1, -1)
            self.counting.record(Request(now, connection, method.decode(),
                                         path.decode(errors="replace"), start, end))
        self.counting.add(
            bytes_up=len(data),
            http_requests=len(_REQUEST_LINE.findall(data)),
            range_requests=len(ranges),
            range_bytes=sum(int(b) - int(a) + 1 for a, b in ranges if a and b),
        )

    def count_down(self, data: bytes) -> None:
        self.counting.add(bytes_down=len(data))

    async def handle(self, client: trio.SocketStream, upstream: tuple[str, int]) -> None:
        self.counting.add(connections=1)
        self.connection_ids += 1
        connection = self.connection_ids
        try:
            # The TCP handshake crosses the link too: one RTT before the first byte can go.
            await trio.sleep(self.model.rtt_ms / 1000.0)
            server = await trio.open_tcp_stream(*upstream)
        except OSError:
            await client.aclose()
            return
        try:
            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, server, self.up, self.model.one_way_s,
                                   self.read_size, lambda data: self.count_up(data, connection))
                nursery.start_soon(_pump, server, client, self.down, self.model.one_way_s,
                                   self.read_size, self.count_down)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # A peer went away mid-write: that connection ends, the proxy serves on.
            pass


async def serve(
    upstream: tuple[str, int],
    model: LinkModel,
    counting: _Counting,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; report the listening port through ``task_status``."""
    link = _Link(model, counting)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await link.handle(stream, upstream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
        await trio.sleep_forever()


class LinkProxy:
    """The proxy in a thread of its own, for synchronous callers (the benchmark)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        mbit: float = 0.0,
        rtt_ms: float = 0.0,
        lifetime: float = DEFAULT_LIFETIME,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.model = LinkModel(mbit, rtt_ms)
        self.lifetime = lifetime
        self.host = host
        self._want_port = port
        self._counting = _Counting()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def counters(self) -> Counters:
        return self._counting.snapshot()

    def requests_since(self, since: float) -> list[Request]:
        """HTTP requests seen since ``since`` (a ``time.monotonic()`` value), oldest first."""
        return self._counting.requests_since(since)

    def start(self, timeout: float = 10.0) -> int:
        self._thread = threading.Thread(target=self._run, name="netproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("netproxy did not start")
        if self._error is not None:
            raise RuntimeError(f"netproxy failed: {self._error!r}") from self._error
        return self.port

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            # Bounded lifetime: a forgotten proxy stops by itself.
            with trio.move_on_after(self.lifetime) as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    self.port = await nursery.start(
                        lambda task_status=trio.TASK_STATUS_IGNORED: serve(
                            self.upstream, self.model, self._counting, host=self.host,
                            port=self._want_port, task_status=task_status,
                        )
                    )
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._token is not None and self._scope is not None and thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        thread.join(timeout=10)

    def __enter__(self) -> LinkProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- self-check -----------------------------------------------------------------------------

async def _selfcheck(model: LinkModel, megabytes: float, pings: int) -> dict[str, float]:
    """Through the proxy: bulk download throughput and 1-byte ping-pong RTT."""
    counting = _Counting()
    bulk = int(megabytes * 1e6)
    payload = bytes(range(256)) * 256  # 64 KiB

    async def server(stream: trio.SocketStream) -> None:
        async with stream:
            command = await stream.receive_some(1)
            if command == b"B":  # bulk: send `bulk` bytes, then close
                left = bulk
                while left:
                    piece = payload[: min(left, len(payload))]
                    await stream.send_all(piece)
                    left -= len(piece)
            elif command == b"P":  # ping-pong: echo every byte
                while data := await stream.receive_some(1):
                    await stream.send_all(data)

    results: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server_port = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, server, listeners)
        proxy_port = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: serve(
                ("127.0.0.1", server_port), model, counting, task_status=task_status)
        )

        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        async with stream:
            await stream.send_all(b"P")
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                await stream.send_all(b"x")
                await stream.receive_some(1)
                rtts.append(time.perf_counter() - t0)
        results["rtt_ms_median"] = statistics.median(rtts) * 1000

        t0 = time.perf_counter()
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        got = 0
        async with stream:
            await stream.send_all(b"B")
            first = 0.0
            while data := await stream.receive_some(1 << 20):
                if not got:
                    first = time.perf_counter()
                got += len(data)
        done = time.perf_counter()
        results["bulk_bytes"] = got
        results["bulk_seconds"] = done - t0
        results["bulk_mbit"] = got * 8 / 1e6 / max(done - first, 1e-9)
        nursery.cancel_scope.cancel()
    counters = counting.snapshot()
    results["counted_down"] = counters.bytes_down
    results["counted_up"] = counters.bytes_up
    return results


def selfcheck(
    mbit: float, rtt_ms: float, megabytes: float = 20.0, pings: int = 20
) -> dict[str, float]:
    return trio.run(_selfcheck, LinkModel(mbit, rtt_ms), megabytes, pings)


def _parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "selfcheck"):
        p = sub.add_parser(name)
        p.add_argument("--mbit", type=float, default=100.0, help="link rate, 0 = unlimited")
        p.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time to add")
        if name == "serve":
            p.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
            p.add_argument("--port", type=int, default=0, help="listening port (0: any)")
            p.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME,
                           help="stop after this many seconds")
        else:
            p.add_argument("--megabytes", type=float, default=20.0)
    args = parser.parse_args(argv)

    if args.command == "selfcheck":
        r = selfcheck(args.mbit, args.rtt_ms, args.megabytes)
        expected_s = r["bulk_bytes"] * 8 / (args.mbit * 1e6) if args.mbit else 0.0
        print(f"link model: {args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT")
        print(f"1-byte ping-pong: median {r['rtt_ms_median']:.1f} ms (expected ~{args.rtt_ms:g})")
        print(f"bulk {r['bulk_bytes'] / 1e6:.1f} MB in {r['bulk_seconds']:.2f} s "
              f"({r['bulk_mbit']:.1f} Mbit/s; expected ~{expected_s + args.rtt_ms * 1.5e-3:.2f} s)")
        print(f"counted: {r['counted_down']} bytes down, {r['counted_up']} bytes up")
        return 0

    proxy = LinkProxy(_parse_hostport(args.upstream), mbit=args.mbit, rtt_ms=args.rtt_ms,
                      lifetime=args.lifetime, port=args.port)
    proxy.start()
    print(f"listening on {proxy.address} -> {args.upstream} "
          f"({args.mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT, stops in {args.lifetime:g} s)",
          flush=True)
    try:
        assert proxy._thread is not None
        proxy._thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        print(f"counters: {proxy.counters()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
