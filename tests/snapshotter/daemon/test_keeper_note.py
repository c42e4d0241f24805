"""The fuse keeper's note: what a daemon stopping cleanly leaves for the next one (its FUSE
passthrough state) travels with the connection's fd, once. A pipe stands in for /dev/fuse."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.daemon import keeper


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "keeper.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    fuse_read, fuse_write = os.pipe()  # alive while the write end is open
    kept = keeper._Keeper(listener, fuse_read, path, "/mnt", "0:99")
    thread = threading.Thread(target=kept.run, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        keeper.retire(path)
        thread.join(10)
        kept.close()
        os.close(fuse_write)


def _take(path: Path) -> dict[str, object]:
    answer = keeper._ask(path, b"take")
    assert answer is not None
    info, fds = answer
    assert len(fds) == 1
    os.close(fds[0])
    return info


def test_a_note_is_handed_over_with_the_fd_once(socket_path: Path) -> None:
    # Larger than one read: a note lists every open file of the mount.
    note = {"passthrough": {"opens": [[inode, 1, 0] for inode in range(20_000)], "backing": []}}
    assert keeper.leave_note(socket_path, note)
    assert _take(socket_path)["note"] == note
    assert _take(socket_path)["note"] is None  # it described the connection at one stop only


def test_no_note_without_a_keeper(tmp_path: Path) -> None:
    assert not keeper.leave_note(tmp_path / "none.sock", {"passthrough": {}})


def test_a_note_over_the_bound_is_not_sent(socket_path: Path) -> None:
    assert not keeper.leave_note(socket_path, {"x": "y" * keeper.MAX_NOTE_BYTES})
    assert _take(socket_path)["note"] is None


def test_a_bad_note_leaves_the_keeper_running(socket_path: Path) -> None:
    for data in (b"note {", b"note " + b"[" * 10_000 + b"]" * 10_000):
        assert keeper._ask(socket_path, data) is not None
    assert keeper.leave_note(socket_path, {"passthrough": {}})
    assert _take(socket_path)["note"] == {"passthrough": {}}
