"""Preparing the daemon's unix socket path: private directory, stale sockets, sockets in use."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path


class SocketError(Exception):
    """The socket path cannot be used; the message says why."""


def _is_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise SocketError(f"cannot probe existing socket {path}: {exc.strerror}") from None
    return True


def prepare_socket_path(path: Path) -> None:
    """Make the parent directory (0700) and remove a stale socket; refuse one that is served."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    except OSError as exc:
        raise SocketError(f"cannot create socket directory {path.parent}: {exc.strerror}") from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    if _is_served(path):
        raise SocketError(f"{path} is in use: another daemon is serving on it")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
