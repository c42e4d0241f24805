"""systemd's notify protocol (READY=1, STOPPING=1) without a libsystemd dependency."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` to $NOTIFY_SOCKET; return False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket name
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True
