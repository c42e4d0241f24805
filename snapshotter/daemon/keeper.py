"""Keep the FUSE connection alive across a daemon crash: a tiny process holding a dup of the
``/dev/fuse`` fd.

The kernel ends a FUSE connection when the last fd of ``/dev/fuse`` closes, and every container
reading through it then gets ENOTCONN. The daemon therefore hands a duplicate of its fd to this
keeper, which is started detached, in its own session and with KillMode=process in the unit.
The keeper

* never reads from the fd, so requests wait in the kernel while no daemon runs;
* gives a copy to whoever asks on its unix socket ``<root>/fuse-keeper.sock``, mode 0600 for
  root only, with SCM_RIGHTS, so a restarted daemon can serve the same connection;
* keeps a note that a daemon stopping cleanly leaves for the next one (the connection's FUSE
  passthrough state: backing ids and open counts that only that daemon knew) and hands it
  over with the fd, once: it describes the connection at that stop only;
* exits by itself once the connection ends: the daemon unmounted on a clean stop, or an
  operator did. The fd then polls POLLERR; the keeper checks on every mount table change and
  every second, and not on every request, which would wake it for each FUSE read.

Run as ``python -m snapshotter.daemon.keeper`` by ``start_keeper``; the daemon talks to it with
``take_over`` and ``retire``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import socket
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from snapshotter.logs import setup_logging

log = logging.getLogger("snapshotter.daemon.keeper")  # also when run as __main__

SOCKET_NAME: Final = "fuse-keeper.sock"
_CHECK_SECONDS: Final = 1.0
_CLIENT_TIMEOUT: Final = 5.0
_TAKE: Final = b"take"
_EXIT: Final = b"exit"
_NOTE: Final = b"note "
# A note holds a few numbers per open file of the mount; this bounds what a client can make the
# keeper hold.
MAX_NOTE_BYTES: Final = 16 << 20


def keeper_socket(root: Path) -> Path:
    return root / SOCKET_NAME


def mount_device(mountpoint: Path) -> str | None:
    """``major:minor`` of the top FUSE mount at ``mountpoint``, from mountinfo.

    Read from /proc, never with stat(): a stat of the mount root would wait for an answer from
    the very daemon that is not running yet.
    """
    # Resolve the parent only: resolving the mount root itself would stat it.
    target = os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if _unescape(fields[4]) == target and fields[separator + 1].startswith("fuse"):
                found = fields[2]
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\"
    )


def connection_alive(fd: int) -> bool:
    """False once the kernel ended the connection. With events=0 only POLLERR/HUP/NVAL
    report."""
    poller = select.poll()
    poller.register(fd, 0)
    return not poller.poll(0)


# -- the daemon's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Handover:
    fd: int
    device: str
    keeper_pid: int
    note: object = None  # what the previous daemon left with ``leave_note``, if anything


def _ask(socket_path: Path, command: bytes) -> tuple[dict[str, object], list[int]] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(_CLIENT_TIMEOUT)
        try:
            conn.connect(str(socket_path))
            conn.sendall(command)
            conn.shutdown(socket.SHUT_WR)
            data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 1)
            data += _read_to_end(conn, MAX_NOTE_BYTES + 4096 - len(data))
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no keeper: none started, or it exited with its connection
        except OSError as exc:
            log.warning("fuse keeper did not answer socket=%s error=%r", socket_path, exc)
            return None
    try:
        return json.loads(data or b"{}"), fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        return None


def _read_to_end(conn: socket.socket, limit: int) -> bytes:
    parts = []
    while limit > 0:
        part = conn.recv(min(limit, 1 << 20))
        if not part:
            break
        parts.append(part)
        limit -= len(part)
    return b"".join(parts)


def leave_note(socket_path: Path, note: object) -> bool:
    """Leave ``note`` (JSON) with the keeper for the next daemon that takes the connection over;
    False when no keeper took it (none, or one from before notes: then nothing is carried)."""
    data = _NOTE + json.dumps(note, separators=(",", ":")).encode()
    if len(data) > MAX_NOTE_BYTES:
        log.warning("fuse keeper note too large bytes=%d", len(data))
        return False
    answer = _ask(socket_path, data)
    if answer is None:
        return False
    info, fds = answer
    for fd in fds:
        os.close(fd)
    return info.get("noted") is True


def take_over(socket_path: Path, mountpoint: Path) -> Handover | None:
    """The live connection for the FUSE mount at ``mountpoint``, or None.

    None when no keeper answers, or its connection ended, or it is not the one mounted at
    ``mountpoint``; that keeper is told to exit. The keeper keeps its own copy.
    """
    answer = _ask(socket_path, _TAKE)
    if answer is None:
        return None
    info, fds = answer
    if len(fds) != 1:
        log.warning("fuse keeper sent no fd socket=%s answer=%s", socket_path, info)
        return None
    fd = fds[0]
    device = str(info.get("device"))
    pid = int(str(info.get("pid", 0)))
    reason = None
    if info.get("mountpoint") != str(mountpoint):
        reason = f"it keeps the mount at {info.get('mountpoint')}"
    elif not connection_alive(fd):
        reason = "its connection has ended"
    elif mount_device(mountpoint) != device:
        reason = f"{mountpoint} is not its mount (device {device})"
    if reason is not None:
        log.warning("fuse keeper connection not adopted keeper_pid=%d reason=%s", pid, reason)
        os.close(fd)
        retire(socket_path)
        return None
    return Handover(fd, device, pid, info.get("note"))


def retire(socket_path: Path) -> None:
    """Ask a keeper, if there is one, to let go of its connection and exit."""
    _ask(socket_path, _EXIT)


def start_keeper(socket_path: Path, fd: int, mountpoint: Path) -> int:
    """Start a keeper holding a copy of ``fd``, the connection mounted at ``mountpoint``;
    returns its pid. The listening socket is bound here, before returning, so a daemon that
    dies right after still leaves a keeper that answers."""
    device = mount_device(mountpoint)
    if device is None:
        raise RuntimeError(f"no FUSE mount at {mountpoint}")
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a stale socket, or one whose keeper is on its way out
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # born 0600: the fd gives full control of the mount
        try:
            listener.bind(str(socket_path))
        finally:
            os.umask(old_umask)
        listener.listen(8)
        process = subprocess.Popen(
            [sys.executable, "-m", "snapshotter.daemon.keeper",
             "--listen-fd", str(listener.fileno()), "--fuse-fd", str(fd),
             "--socket", str(socket_path), "--mountpoint", str(mountpoint),
             "--device", device],
            pass_fds=(listener.fileno(), fd),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=_keeper_stderr(),
            start_new_session=True,  # outlives the daemon and its process group's signals
            cwd="/",  # holds no directory busy
        )
    finally:
        listener.close()
    log.info("fuse keeper started pid=%d socket=%s device=%s", process.pid, socket_path, device)
    return process.pid


def _keeper_stderr() -> int | None:
    """The daemon's stderr, such as the journal or a log file, but never a pipe: whoever reads the
    daemon's output through one would wait for the keeper to exit as well."""
    try:
        if stat.S_ISFIFO(os.fstat(2).st_mode):
            return subprocess.DEVNULL
    except OSError:
        return subprocess.DEVNULL
    return None


# -- the keeper ----------------------------------------------------------------------------


class _Keeper:
    def __init__(
        self, listener: socket.socket, fuse_fd: int, socket_path: Path, mountpoint: str,
        device: str,
    ) -> None:
        self._listener = listener
        self._fuse_fd = fuse_fd
        self._socket_path = socket_path
        self._socket_ino = os.stat(socket_path).st_ino
        self._mountpoint = mountpoint
        self._device = device
        self._note: object = None

    def run(self) -> str:
        """Serve until the connection ends or someone asks us to exit; returns why."""
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        # A changed mount table, by an unmount among others, makes this poll POLLPRI|POLLERR:
        # the moment to look at the connection again.
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            poller.register(mountinfo.fileno(), select.POLLPRI)
            while True:
                ready = poller.poll(int(_CHECK_SECONDS * 1000))
                if not connection_alive(self._fuse_fd):
                    return "connection ended"
                if any(fd == self._listener.fileno() for fd, _ in ready) and self._client():
                    return "asked to exit"

    def _client(self) -> bool:
        """Answer one client; True when it asked us to exit."""
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return False
        with conn:
            conn.settimeout(_CLIENT_TIMEOUT)
            try:
                command = _read_to_end(conn, MAX_NOTE_BYTES + 1).strip()
                if command == _EXIT:
                    conn.sendall(b"{}")
                    return True
                if command == _TAKE:
                    info = {"mountpoint": self._mountpoint, "device": self._device,
                            "pid": os.getpid(), "note": self._note}
                    data = json.dumps(info).encode()
                    # The fd rides on the first bytes; a long note follows.
                    socket.send_fds(conn, [data[:4096]], [self._fuse_fd])
                    conn.sendall(data[4096:])
                    # A note describes the connection when its daemon stopped: the next
                    # daemon adopts it, and one after that must not.
                    self._note = None
                    log.info("fuse keeper handed the connection over device=%s", self._device)
                elif command.startswith(_NOTE):
                    self._note = json.loads(command[len(_NOTE) :])
                    conn.sendall(b'{"noted":true}')
                    log.info("fuse keeper took a note for the next daemon bytes=%d",
                             len(command))
            except Exception as exc:  # a client, whatever it sends, must never end the connection
                log.warning("fuse keeper client failed error=%r", exc)
        return False

    def close(self) -> None:
        self._listener.close()
        os.close(self._fuse_fd)
        # Only our own socket: a newer keeper may have bound the path since.
        with contextlib.suppress(OSError):
            if os.stat(self._socket_path).st_ino == self._socket_ino:
                self._socket_path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapshotter.daemon.keeper")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--fuse-fd", type=int, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--device", required=True)
    args = parser.parse_args(argv)
    setup_logging("info", "json")
    listener = socket.socket(fileno=args.listen_fd)
    keeper = _Keeper(listener, args.fuse_fd, args.socket, args.mountpoint, args.device)
    log.info("fuse keeper running pid=%d mountpoint=%s device=%s",
             os.getpid(), args.mountpoint, args.device)
    try:
        why = keeper.run()
    finally:
        keeper.close()
    log.info("fuse keeper exiting pid=%d reason=%s", os.getpid(), why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
