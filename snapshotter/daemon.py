"""The composition root: build the snapshotter, serve gRPC, run trio on the main thread.

grpcio's async API is asyncio-only, so the gRPC server is the synchronous one on a thread pool;
the main thread runs ``trio.run`` (the home of the FUSE session and registry fetches) and waits
there for SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from concurrent import futures
from pathlib import Path

import grpc
import trio

from snapshotter.config import Config
from snapshotter.grpc_service import add_services
from snapshotter.metadata import MetadataError
from snapshotter.sdnotify import notify
from snapshotter.snapshots import Snapshotter
from snapshotter.socket_path import SocketError, prepare_socket_path
from snapshotter.version import VERSION

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # containerd's own limit
GRPC_WORKERS = 16
SHUTDOWN_GRACE_SECONDS = 10.0


class StartupError(Exception):
    """The daemon cannot start; the message is meant for the operator."""


def _open_snapshotter(root: Path) -> Snapshotter:
    try:
        return Snapshotter(root)
    except PermissionError as exc:
        raise StartupError(f"state root {root} is not writable: {exc.strerror}") from None
    except OSError as exc:
        raise StartupError(f"cannot use state root {root}: {exc.strerror or exc}") from None
    except MetadataError as exc:
        raise StartupError(str(exc)) from None


def _start_server(snapshotter: Snapshotter, address: Path) -> grpc.Server:
    try:
        prepare_socket_path(address)
    except SocketError as exc:
        raise StartupError(str(exc)) from None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_services(server, snapshotter)
    old_umask = os.umask(0o117)  # the socket is born 0660, never briefly world-accessible
    try:
        bound = server.add_insecure_port(f"unix:{address}")
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    finally:
        os.umask(old_umask)
    if not bound:
        raise StartupError(f"cannot listen on {address}")
    os.chmod(address, 0o660)
    server.start()
    return server


async def _wait_for_stop_signal() -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            return int(signum)
    return 0


def serve(config: Config) -> int:
    snapshotter = _open_snapshotter(config.root)
    try:
        server = _start_server(snapshotter, config.address)
    except BaseException:
        snapshotter.close()
        raise
    log.info(
        "serving", extra={"version": VERSION, "root": str(config.root),
                          "address": str(config.address), "pid": os.getpid()},
    )
    notify(f"READY=1\nSTATUS=serving on {config.address}\nMAINPID={os.getpid()}")
    try:
        signum = trio.run(_wait_for_stop_signal)
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
    finally:
        notify("STOPPING=1")
        # In-flight RPCs finish (each is one sqlite transaction); new ones are refused.
        server.stop(SHUTDOWN_GRACE_SECONDS).wait()
        snapshotter.close()
        with contextlib.suppress(FileNotFoundError):
            config.address.unlink()
    log.info("stopped")
    return 0
