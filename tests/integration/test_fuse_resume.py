"""A FUSE server killed with SIGKILL while a fuse keeper holds its connection: the next server
takes the connection over and the mount never goes away (fake layers, real FUSE).

The server is ``tests.support.fuse_resume_server``: the daemon's FUSE start-up in small (take
over from the keeper or mount and start one; attach layers at fixed slots; then answer).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapshotter.daemon import keeper as fuse_keeper
from tests.integration.fuse_support import (
    BIG,
    PASSTHROUGH_BIG,
    REPO,
    force_unmount,
    is_mounted,
    python_args,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # so ``python -m tests...`` resolves


@dataclass
class Servers:
    """Starts servers for one mountpoint, one after the other; tears everything down."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    @property
    def keeper(self) -> Path:
        return self.root / "keeper.sock"

    @property
    def ready_file(self) -> Path:
        return self.root / "mnt.ready"

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        # (No mkdir here: touching an orphaned mount point would wait for a server.)
        self.ready_file.unlink(missing_ok=True)
        log = (self.root / f"server{len(self.processes)}.log").open("ab")
        proc = subprocess.Popen(
            python_args("-m", "tests.support.fuse_resume_server", str(self.mnt),
                        str(self.root / "cache"), str(self.keeper), *extra),
            stdout=subprocess.DEVNULL, stderr=log,
        )
        log.close()
        self.processes.append(proc)
        deadline = time.monotonic() + 30
        while not self.ready_file.exists():
            assert proc.poll() is None, f"server exited {proc.returncode}: {self.logs()}"
            assert time.monotonic() < deadline, f"server not ready: {self.logs()}"
            time.sleep(0.05)
        return proc

    def how(self) -> str:
        return self.ready_file.read_text().split()[1]

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def teardown(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        fuse_keeper.retire(self.keeper)  # a keeper left after a test lets go of its mount
        if is_mounted(self.mnt):
            force_unmount(self.mnt)


@pytest.fixture
def servers(tmp_path: Path, in_repo: None) -> Iterator[Servers]:
    s = Servers(tmp_path)
    s.mnt.mkdir()
    try:
        yield s
    finally:
        s.teardown()


def _keeper_alive(servers: Servers) -> bool:
    return servers.keeper.exists()


@contextlib.contextmanager
def _reader(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process reading ``path`` (a process, not a thread: it can be killed if it hangs)."""
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _check_tree(mnt: Path) -> None:
    """What the fake layers look like through the mount (either server)."""
    assert sorted(os.listdir(mnt)) == ["base", "top"]
    assert sorted(os.listdir(mnt / "base/etc")) == ["keep", "old"]
    assert os.readlink(mnt / "base/link") == "bin/tool"
    tool = os.stat(mnt / "base/bin/alias")
    assert tool.st_mode == stat.S_IFREG | 0o4755 and (tool.st_uid, tool.st_gid) == (7, 8)
    assert tool.st_nlink == 2
    assert (mnt / "base/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (mnt / "base/caf\u00e9").read_bytes() == b"unicode name\n"
    assert os.getxattr(mnt / "base/big", "user.note") == b"hello"
    assert os.listxattr(mnt / "base/big") == ["user.note"]
    assert os.getxattr(mnt / "top/etc", "trusted.overlay.opaque") == b"y"
    with pytest.raises(OSError) as info:
        os.getxattr(mnt / "base/etc/keep", "user.none")
    assert info.value.errno == errno.ENODATA
    null = os.lstat(mnt / "base/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    whiteout = os.lstat(mnt / "top/doomed")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.statvfs(mnt).f_namemax == 255
    with pytest.raises(OSError) as info:
        (mnt / "base/bad").read_bytes()
    assert info.value.errno == errno.EIO  # a chunk failing its digest, as before the crash
    with pytest.raises(OSError) as info:
        os.open(mnt / "base/etc/keep", os.O_WRONLY)
    assert info.value.errno == errno.EROFS


def test_a_killed_server_s_mount_is_served_by_the_next_one(servers: Servers) -> None:
    mnt = servers.mnt
    first = servers.start()
    assert servers.how() == "mounted"
    wait_for(lambda: _keeper_alive(servers), 10, "the keeper's socket")
    assert (mnt / "base/etc/keep").read_bytes() == b"base keep\n"
    before = {name: os.lstat(mnt / name).st_ino for name in ("base", "top", "base/bin/tool")}
    opened = os.open(mnt / "base/big", os.O_RDONLY)  # open across the crash, never read yet
    try:
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert is_mounted(mnt), "the keeper holds the connection: the mount stays"
        assert _keeper_alive(servers)

        with _reader(mnt / "base/etc/old") as blocked:  # never read: needs a server
            time.sleep(1.0)
            assert blocked.poll() is None, "the read waits in the kernel while no server runs"

            servers.start()
            assert servers.how() == "adopted"
            out, err = blocked.communicate(timeout=30)
            assert blocked.returncode == 0, err
            assert out == b"base old\n"

        # The fd opened before the crash reads through the new server (handles are inodes).
        assert os.pread(opened, len(BIG) + 10, 0) == BIG
    finally:
        os.close(opened)

    assert {name: os.lstat(mnt / name).st_ino for name in before} == before
    _check_tree(mnt)

    # A second crash and takeover: the keeper still holds its own copy.
    servers.processes[-1].send_signal(signal.SIGKILL)
    servers.processes[-1].wait()
    servers.start()
    assert servers.how() == "adopted"
    assert (mnt / "top/etc/new").read_bytes() == b"top new\n"

    # A clean stop unmounts, and the keeper goes with the connection.
    last = servers.processes[-1]
    last.send_signal(signal.SIGTERM)
    assert last.wait(timeout=20) == 0
    assert not is_mounted(mnt)
    wait_for(lambda: not _keeper_alive(servers), 10, "the keeper to exit")


def test_without_a_keeper_a_killed_server_s_mount_is_dead(servers: Servers) -> None:
    """What the keeper is for: the last /dev/fuse fd closing ends the connection."""
    first = servers.start("--no-keeper")
    assert (servers.mnt / "base/etc/keep").read_bytes() == b"base keep\n"
    first.send_signal(signal.SIGKILL)
    first.wait()
    with pytest.raises(OSError) as info:
        (servers.mnt / "base/etc/old").read_bytes()
    assert info.value.errno == errno.ENOTCONN


def test_the_keeper_exits_when_the_orphaned_mount_is_unmounted(servers: Servers) -> None:
    first = servers.start()
    wait_for(lambda: _keeper_alive(servers), 10, "the keeper's socket")
    first.send_signal(signal.SIGKILL)
    first.wait()
    force_unmount(servers.mnt)
    wait_for(lambda: not _keeper_alive(servers), 10, "the keeper to exit")
    # Nothing to take over: the next server mounts anew (and starts its own keeper).
    servers.start()
    assert servers.how() == "mounted"
    assert (servers.mnt / "base/etc/old").read_bytes() == b"base old\n"


def test_a_request_the_killed_server_never_answered_is_answered_by_the_next(
    servers: Servers,
) -> None:
    """The dead server had read the request: only the next one can release its caller."""
    first = servers.start("--stall-top")
    with _reader(servers.mnt / "top/etc/new") as stuck:
        time.sleep(1.0)
        assert stuck.poll() is None, "the first server never answers reads of top"
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(0.5)
        assert stuck.poll() is None, "a request read by the dead server waits"
        servers.start()
        out, err = stuck.communicate(timeout=30)
    # The lost READ was readahead (then the kernel reads again, synchronously, and the new
    # server answers) or a synchronous read (then the read fails with EINTR); it never hangs.
    if stuck.returncode == 0:
        assert out == b"top new\n"
    else:
        assert b"Interrupted system call" in err, err
    assert "fuse requests of the previous process answered" in servers.logs()
    assert (servers.mnt / "top/etc/new").read_bytes() == b"top new\n"


def test_the_protocol_server_serves_a_fresh_mount_from_init_on(
    servers: Servers, tmp_path: Path
) -> None:
    """No libfuse at all: the same tree, inode numbers and overlayfs behaviour."""
    servers.start("--raw", "--no-keeper")
    assert servers.how() == "raw"
    mnt = servers.mnt
    _check_tree(mnt)
    assert os.stat(mnt).st_ino == 1
    assert os.stat(mnt / "base").st_ino == (1 << 32) | 1
    assert os.stat(mnt / "top").st_ino == (2 << 32) | 1
    assert (mnt / "base/big").read_bytes() == BIG
    merged, upper, work = tmp_path / "merged", tmp_path / "upper", tmp_path / "work"
    for d in (merged, upper, work):
        d.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={mnt / 'top'}:{mnt / 'base'},upperdir={upper},workdir={work}", str(merged)],
        check=True, capture_output=True,
    )
    try:
        assert not (merged / "doomed").exists(), "the top layer's whiteout applies"
        assert sorted(os.listdir(merged / "etc")) == ["new"], "top's etc is opaque"
        assert (merged / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
        (merged / "written").write_text("upper")
        assert (upper / "written").read_text() == "upper"
    finally:
        subprocess.run(["umount", str(merged)], check=False, capture_output=True)
    last = servers.processes[-1]
    last.send_signal(signal.SIGTERM)
    assert last.wait(timeout=20) == 0
    assert not is_mounted(mnt)


def test_the_keeper_hands_its_connection_over_only_for_its_own_mount(servers: Servers) -> None:
    servers.start()
    wait_for(lambda: _keeper_alive(servers), 10, "the keeper's socket")
    assert stat.S_IMODE(os.stat(servers.keeper).st_mode) == 0o600
    handover = fuse_keeper.take_over(servers.keeper, servers.mnt)
    assert handover is not None  # (what a restarted server gets; this one just closes it)
    os.close(handover.fd)
    assert fuse_keeper.take_over(servers.keeper, servers.root / "elsewhere") is None
    wait_for(lambda: not _keeper_alive(servers), 10, "the refused keeper to exit")
    # The serving process is not affected.
    assert (servers.mnt / "base/etc/keep").read_bytes() == b"base keep\n"


def _restart_leaving_the_mount(servers: Servers, *extra: str) -> None:
    """SIGTERM with ``--leave-on-term`` (the daemon's ``keep_mounted_on_stop``), then a new
    server that takes the connection over."""
    last = servers.processes[-1]
    last.send_signal(signal.SIGTERM)
    assert last.wait(timeout=20) == 0
    assert is_mounted(servers.mnt)
    servers.start(*extra)
    assert servers.how() == "adopted"


def test_passthrough_goes_on_across_restarts_that_leave_the_mount(servers: Servers) -> None:
    """The kernel keeps one I/O mode per open inode: a file open in passthrough refuses a
    page-cache open (EIO), one open through the page cache refuses a passthrough open. The
    next server must answer as the previous one would have, so it takes over its backing
    ids and open counts (through the keeper)."""
    flags = ("--passthrough", "--leave-on-term")
    servers.start(*flags)
    if "passthrough=on" not in servers.logs():
        pytest.skip(f"the kernel ({os.uname().release}) did not offer FUSE passthrough at INIT "
                    "(needs Linux >= 6.9 built with CONFIG_FUSE_PASSTHROUGH)")
    wait_for(lambda: _keeper_alive(servers), 10, "the keeper's socket")
    huge = servers.mnt / "base/huge"
    cached = os.open(huge, os.O_RDONLY)  # a page-cache open, held across the first restart
    try:
        assert os.pread(cached, len(PASSTHROUGH_BIG) + 1, 0) == PASSTHROUGH_BIG
        # Whole in the cache now: another open starts the backing copy.
        deadline = time.monotonic() + 20
        while "passthrough backing file registered" not in servers.logs():
            assert time.monotonic() < deadline, servers.logs()
            assert huge.read_bytes() == PASSTHROUGH_BIG
            time.sleep(0.1)

        _restart_leaving_the_mount(servers, *flags)
        assert "fuse passthrough adopted backing_files=1" in servers.logs()
        # The inode is in page-cache mode: answered onto the copy, this open would fail.
        assert huge.read_bytes() == PASSTHROUGH_BIG
    finally:
        os.close(cached)
    # Its last page-cache open released (a RELEASE counted against the adopted count), the
    # file now opens onto its copy; this open is held across the second restart.
    held = os.open(huge, os.O_RDONLY)
    try:
        _restart_leaving_the_mount(servers, *flags)
        # The inode is in passthrough mode: a page-cache answer would fail with EIO.
        assert huge.read_bytes() == PASSTHROUGH_BIG
        assert os.pread(held, 4096, 1 << 20) == PASSTHROUGH_BIG[1 << 20 : (1 << 20) + 4096]
    finally:
        os.close(held)
    with open(huge, "rb") as again:
        assert again.read() == PASSTHROUGH_BIG
