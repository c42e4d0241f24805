"""A fault-injecting HTTP/1.1 proxy on loopback, in front of a real registry.

Faults are queued and consumed in order by the requests they match (method and path); every
other request passes through unchanged. Kinds: connection reset, an error status (500, 503,
429 with ``Retry-After``...), a stall (no answer until the client gives up or the stall
limit passes), a truncated body, a body sent slowly in small pieces, the whole blob with
``200`` instead of the asked range, a range followed by a flood of extra bytes, and bytes of
the right length that are wrong (at the storage, or on a blob GET when asked to match it). Everything is bounded in time: stalls end
when the proxy stops.

With ``redirect_blobs`` set, blob GETs are answered like a registry on object storage does: a
``307`` to a presigned-looking URL on another host name (``localhost``) with a signature in the
query, served by the proxy itself from a copy of the blob.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}

Match = Callable[[str, str], bool]  # (method, path) -> applies?


def blob_gets(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/sha256:" in path


def everything(method: str, path: str) -> bool:
    return True


def storage_gets(method: str, path: str) -> bool:
    return method == "GET" and path.startswith(STORAGE_PREFIX)


STORAGE_PREFIX = "/_storage/"
FLOOD_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fault:
    kind: (
        str  # "reset" | "status" | "stall" | "truncate" | "slow" | "full" | "oversize" | "garbage"
    )
    status: int = 503
    retry_after: str | None = None
    stall_seconds: float = 30.0
    slow_chunk: int = 4096
    slow_delay: float = 0.005
    extra_bytes: int = 0
    match: Match = blob_gets


def reset(match: Match = blob_gets) -> Fault:
    return Fault("reset", match=match)


def status(code: int, retry_after: str | None = None, match: Match = blob_gets) -> Fault:
    return Fault("status", status=code, retry_after=retry_after, match=match)


def stall(seconds: float = 30.0, match: Match = blob_gets) -> Fault:
    return Fault("stall", stall_seconds=seconds, match=match)


def truncate(match: Match = blob_gets) -> Fault:
    return Fault("truncate", match=match)


def slow(chunk: int = 4096, delay: float = 0.005, match: Match = blob_gets) -> Fault:
    return Fault("slow", slow_chunk=chunk, slow_delay=delay, match=match)


def full(match: Match = blob_gets) -> Fault:
    """The whole blob with ``200``: the Range header ignored, as a misbehaving proxy does."""
    return Fault("full", match=match)


def oversize(extra_bytes: int, match: Match = blob_gets) -> Fault:
    """The asked range, then ``extra_bytes`` more, without a Content-Length."""
    return Fault("oversize", extra_bytes=extra_bytes, match=match)


def garbage(match: Match = storage_gets) -> Fault:
    """Bytes of the right length that are not the blob's (a bad storage node, or with
    ``match=blob_gets`` a registry or cache in front of it that corrupts what it passes on)."""
    return Fault("garbage", match=match)


@dataclass
class FaultProxy:
    upstream: str  # "127.0.0.1:PORT"
    host: str = ""  # "127.0.0.1:PORT" of the proxy, set when started
    faults: list[Fault] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    requests: int = 0
    redirect_blobs: bool = False
    signature: str = "c2lnbmF0dXJlLXNlY3JldA"  # what the presigned URLs carry; change to expire
    stored: dict[str, bytes] = field(default_factory=dict)  # storage object -> blob
    bad_objects: set[str] = field(default_factory=set)  # storage objects that serve garbage
    authorizations: list[str] = field(default_factory=list)  # Authorization headers seen
    flood_sent: int = 0  # extra bytes an "oversize" fault managed to send
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def inject(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self.lock:
            self.requests += 1
            if self.faults and self.faults[0].match(method, path):
                fault = self.faults.pop(0)
                self.applied.append(fault.kind)
                return fault
            return None

    # -- connection handling --------------------------------------------------------------

    def serve_connection(self, conn: socket.socket) -> None:
        conn.settimeout(1.0)
        buffer = b""
        try:
            while not self.stopping.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        if self.stopping.is_set():
                            return
                        continue
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _version = lines[0].split(" ", 2)
                headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
                length = next(
                    (int(v) for k, v in headers if k.strip().lower() == "content-length"), 0
                )
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                if not self._handle(conn, method, path, headers, body):
                    return
        except OSError:
            return
        finally:
            conn.close()

    def _handle(
        self,
        conn: socket.socket,
        method: str,
        path: str,
        headers: list[tuple[str, ...]],
        body: bytes,
    ) -> bool:
        """Answer one request; False when the connection must close."""
        fault = self._take(method, path)
        for key, value in headers:
            if key.strip().lower() == "authorization":
                with self.lock:
                    self.authorizations.append(value.strip())
        if path.startswith(STORAGE_PREFIX):
            return self._storage(conn, path, headers, fault)
        if self.redirect_blobs and fault is None and blob_gets(method, path):
            return self._redirect(conn, path, headers)
        if fault is not None and fault.kind == "reset":
            # SO_LINGER 0: close sends RST instead of FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if fault is not None and fault.kind == "status":
            payload = json.dumps(
                {"errors": [{"code": "INJECTED", "message": f"injected {fault.status}"}]}
            ).encode()
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            conn.sendall(
                self._head(
                    fault.status, [("Content-Type", "application/json")], len(payload), extra
                )
            )
            conn.sendall(payload)
            return True
        if fault is not None and fault.kind == "stall":
            self.stopping.wait(fault.stall_seconds)
            return False
        if fault is not None and fault.kind == "full":
            headers = [h for h in headers if h[0].strip().lower() != "range"]
        status_code, reason_headers, data = self._forward(method, path, headers, body)
        if fault is not None and fault.kind == "oversize":
            return self._flood(conn, status_code, reason_headers, data, fault.extra_bytes)
        if fault is not None and fault.kind == "garbage" and 200 <= status_code < 300:
            data = bytes(b ^ 0x5A for b in data)
        content_length = len(data)
        if method == "HEAD":
            content_length = int(dict(reason_headers).get("__length__", "0"))
        out_headers = [(k, v) for k, v in reason_headers if k != "__length__"]
        conn.sendall(self._head(status_code, out_headers, content_length, {}))
        if method == "HEAD":
            return True
        if fault is not None and fault.kind == "truncate":
            conn.sendall(data[: len(data) // 2])
            return False
        if fault is not None and fault.kind == "slow":
            for start in range(0, len(data), fault.slow_chunk):
                if self.stopping.is_set():
                    return False
                conn.sendall(data[start : start + fault.slow_chunk])
                time.sleep(fault.slow_delay)
            return True
        conn.sendall(data)
        return True

    def _flood(
        self,
        conn: socket.socket,
        status_code: int,
        headers: list[tuple[str, str]],
        data: bytes,
        extra: int,
    ) -> bool:
        # No Content-Length: the body ends when the connection closes, so only the client's
        # own limit stops it.
        conn.sendall(self._head(status_code, headers, None, {"Connection": "close"}))
        conn.sendall(data)
        filler = b"\xee" * FLOOD_CHUNK
        sent = 0
        try:
            while sent < extra and not self.stopping.is_set():
                conn.sendall(filler)
                sent += len(filler)
        except OSError:
            pass  # the client gave up on the body: what we wanted
        with self.lock:
            self.flood_sent += sent
        return False

    def _redirect(self, conn: socket.socket, path: str, headers: list[tuple[str, ...]]) -> bool:
        whole = [h for h in headers if h[0].strip().lower() != "range"]
        status_code, reason_headers, data = self._forward("GET", path, whole, b"")
        if status_code != 200:
            conn.sendall(self._head(status_code, reason_headers, len(data), {}))
            conn.sendall(data)
            return True
        with self.lock:
            name = f"obj{len(self.stored)}"
            self.stored[name] = data
        port = self.host.rsplit(":", 1)[1]
        location = (
            f"http://localhost:{port}{STORAGE_PREFIX}{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature={self.signature}"
        )
        conn.sendall(self._head(307, [("Location", location)], 0, {}))
        return True

    def _storage(
        self, conn: socket.socket, path: str, headers: list[tuple[str, ...]], fault: Fault | None
    ) -> bool:
        name, _, query = path.removeprefix(STORAGE_PREFIX).partition("?")
        data = self.stored.get(name)
        if data is None or f"X-Amz-Signature={self.signature}" not in query:
            payload = b"<Error><Code>AccessDenied</Code></Error>"
            conn.sendall(self._head(403, [], len(payload), {}))
            conn.sendall(payload)
            return True
        wanted = next((v for k, v in headers if k.strip().lower() == "range"), "")
        match = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", wanted)
        if match is None:
            conn.sendall(self._head(200, [], len(data), {}))
            conn.sendall(data)
            return True
        start, end = int(match.group(1)), min(int(match.group(2)), len(data) - 1)
        part = data[start : end + 1]
        if (fault is not None and fault.kind == "garbage") or name in self.bad_objects:
            part = bytes(b ^ 0x5A for b in part)
        content_range = [("Content-Range", f"bytes {start}-{end}/{len(data)}")]
        conn.sendall(self._head(206, content_range, len(part), {}))
        conn.sendall(part)
        return True

    @staticmethod
    def _head(
        status_code: int, headers: list[tuple[str, str]], length: int | None, extra: dict[str, str]
    ) -> bytes:
        reason = http.client.responses.get(status_code, "Status")
        lines = [f"HTTP/1.1 {status_code} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, ...]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            forwarded = {
                k.strip(): v.strip() for k, v in headers if k.strip().lower() not in HOP_BY_HOP
            }
            upstream.request(
                method,
                path,
                body=body if body or method in ("PUT", "POST", "PATCH") else None,
                headers=forwarded,
            )
            response = upstream.getresponse()
            data = response.read()
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            if method == "HEAD":
                out.append(("__length__", response.getheader("Content-Length", "0")))
            return response.status, out, data
        finally:
            upstream.close()


@contextlib.contextmanager
def run_fault_proxy(upstream: str, *, bind: str = "127.0.0.1") -> Iterator[FaultProxy]:
    """Serve on ``bind`` (``"::1"`` for IPv6 loopback); ``proxy.host`` is what references use."""
    proxy = FaultProxy(upstream)
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, 0))
    listener.listen(64)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    proxy.host = f"[{bind}]:{port}" if family == socket.AF_INET6 else f"{bind}:{port}"
    threads: list[threading.Thread] = []

    def accept_loop() -> None:
        while not proxy.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=proxy.serve_connection, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept_loop, name="fault-proxy", daemon=True)
    acceptor.start()
    try:
        yield proxy
    finally:
        proxy.stopping.set()
        acceptor.join(timeout=5)
        listener.close()
        for thread in threads:
            thread.join(timeout=5)
