"""The ``/metrics`` endpoint: Prometheus text over HTTP, on TCP or on a unix socket.

prometheus_client's own server listens on TCP only, so both kinds are served here with its
request handler. Each scrape runs on a thread of its own; what it reads is copied on the trio
thread by the collector's source (``snapshotter.daemon.metrics``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import socketserver
import stat
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler


class MetricsServerError(Exception):
    """The metrics address cannot be served; the message is meant for the operator."""


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """A running endpoint; ``close`` stops it and removes its unix socket."""

    def __init__(self, server: socketserver.BaseServer, address: str,
                 unix_path: Path | None) -> None:
        self._server = server
        self.address = address
        self._unix_path = unix_path
        self._thread = threading.Thread(target=server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()


def start_metrics_server(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` at ``address`` (``HOST:PORT`` or ``unix:/path``, as the config
    checked it). MetricsServerError when the address is in use or cannot be bound."""
    handler = MetricsHandler.factory(registry)
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:"))
        _prepare_unix_path(path, address)
        try:
            unix = _UnixServer(str(path), handler)
        except OSError as exc:
            raise MetricsServerError(f"metrics address {address}: {exc.strerror or exc}") from None
        os.chmod(path, 0o660)
        return MetricsServer(unix, address, path)
    host, _, port = address.rpartition(":")
    ipv6 = host.startswith("[")
    host = host.strip("[]")
    server_class = _Tcp6Server if ipv6 else _TcpServer
    try:
        tcp = server_class((host, int(port)), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsServerError(
                f"metrics address {address} is in use: another process listens on that port "
                "(choose another with metrics.address or --metrics-address)"
            ) from None
        raise MetricsServerError(f"metrics address {address}: {exc.strerror or exc}") from None
    return MetricsServer(tcp, address, None)


def _prepare_unix_path(path: Path, address: str) -> None:
    """Create the directory; refuse a path that is not a socket or a socket that is served;
    remove a stale socket left by a killed daemon."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MetricsServerError(f"metrics address {address}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise MetricsServerError(f"metrics address {address}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody answers: left by a killed process
            return
    raise MetricsServerError(f"metrics address {address} is in use: another process serves "
                             f"on {path}")
