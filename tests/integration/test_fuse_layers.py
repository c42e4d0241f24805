"""One mount, several layers as top-level directories (fake layers, real FUSE, real overlayfs)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.fuse_support import (
    BIG,
    REPO,
    is_mounted,
    python_args,
    running_mount,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse]


def fake_server(mnt: Path, cache: Path, *extra: str) -> list[str]:
    return python_args(
        "-m", "tests.integration.fuse_support", str(mnt), str(cache), "--multi", *extra
    )


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # so ``python -m tests.integration.fuse_support`` resolves


# As root the protocol server mounts and serves, and the kernel caches layer listings; pyfuse3
# serves non-root mounts. The mount root's listing must follow attach and detach under both.
@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize("front_end", [(), ("--libfuse",)], ids=["protocol-server", "pyfuse3"])
def test_layers_are_top_level_directories_attached_and_detached_at_runtime(
    tmp_path: Path, front_end: tuple[str, ...]
) -> None:
    mnt = tmp_path / "mnt"
    with running_mount(fake_server(mnt, tmp_path / "cache", *front_end), mnt) as server:
        wait_for((mnt / "top").exists, 10, "the second layer")
        assert sorted(os.listdir(mnt)) == ["base", "top"]
        root = os.stat(mnt)
        assert root.st_ino == 1 and stat.S_ISDIR(root.st_mode)
        base, top = os.stat(mnt / "base"), os.stat(mnt / "top")
        assert base.st_ino == (1 << 32) | 1 and top.st_ino == (2 << 32) | 1
        tool = os.stat(mnt / "base/bin/tool")
        assert tool.st_ino >> 32 == 1 and tool.st_mode == stat.S_IFREG | 0o4755
        assert (mnt / "base/big").read_bytes() == BIG
        assert os.getxattr(mnt / "base/big", "user.note") == b"hello"
        assert os.getxattr(mnt / "top/etc", "trusted.overlay.opaque") == b"y"
        whiteout = os.lstat(mnt / "top/doomed")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        with pytest.raises(OSError) as info:
            (mnt / "base/bad").read_bytes()
        assert info.value.errno == errno.EIO

        server.proc.send_signal(signal.SIGUSR1)  # report usage, then detach "top"
        wait_for(lambda: not (mnt / "top").exists(), 10, "top to be detached")
        assert os.listdir(mnt) == ["base"]
        usage = json.loads(mnt.with_name("mnt.usage.json").read_text())
        assert usage["base"]["cached_bytes"] >= len(BIG)
        assert usage["base"]["errors"] >= 1 and usage["base"]["verify_failures"] >= 1
        assert usage["top"]["slot"] == 2

        server.proc.send_signal(signal.SIGUSR2)  # attach it again: a fresh slot
        wait_for((mnt / "top").exists, 10, "top to be attached again")
        assert os.stat(mnt / "top").st_ino == (3 << 32) | 1
        assert (mnt / "top/etc/new").read_bytes() == b"top new\n"
        assert sorted(os.listdir(mnt)) == ["base", "top"]
        # A layer's listing, cached by the kernel after the first, stays whole and right.
        first = sorted(os.listdir(mnt / "base"))
        assert sorted(os.listdir(mnt / "base")) == first and "bin" in first
    assert server.proc.returncode == 0
    assert not is_mounted(mnt)


@pytest.mark.usefixtures("in_repo")
@pytest.mark.parametrize("front_end", [(), ("--libfuse",)], ids=["protocol-server", "pyfuse3"])
def test_an_empty_root_listed_before_the_first_attach_shows_the_layer_after_it(
    tmp_path: Path, front_end: tuple[str, ...]
) -> None:
    # The protocol server lets the kernel cache every listing (zero-message opendirs). A
    # cached empty listing has no page to invalidate: the kernel notices the attach only by
    # the root's new mtime, which it asks for because the attach invalidated the root.
    mnt = tmp_path / "mnt"
    command = fake_server(mnt, tmp_path / "cache", "--start-empty", *front_end)
    with running_mount(command, mnt) as server:
        assert os.listdir(mnt) == []
        assert os.listdir(mnt) == []  # from the kernel's cache, on the protocol server
        server.proc.send_signal(signal.SIGUSR2)  # attach "top"
        wait_for((mnt / "top").exists, 10, "top to be attached")
        assert os.listdir(mnt) == ["top"]
        assert sorted(os.listdir(mnt / "top")) == ["doomed", "etc"]
        server.proc.send_signal(signal.SIGUSR1)  # detach it again
        wait_for(lambda: not (mnt / "top").exists(), 10, "top to be detached")
        assert os.listdir(mnt) == []
    assert server.proc.returncode == 0


@pytest.mark.usefixtures("in_repo")
def test_overlayfs_over_two_fuse_layers_honours_whiteouts_and_opaque_dirs(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "mnt"
    merged, upper, work = tmp_path / "merged", tmp_path / "upper", tmp_path / "work"
    for d in (merged, upper, work):
        d.mkdir()
    with running_mount(fake_server(mnt, tmp_path / "cache"), mnt):
        wait_for((mnt / "top").exists, 10, "the second layer")
        options = f"lowerdir={mnt}/top:{mnt}/base,upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        try:
            names = sorted(os.listdir(merged))
            assert "doomed" not in names  # whited out by the top layer
            assert {"bin", "big", "link", "etc", "caf\u00e9", "null", "pipe"} <= set(names)
            assert os.listdir(merged / "etc") == ["new"]  # opaque: base's files are hidden
            assert (merged / "big").read_bytes() == BIG
            assert (merged / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
            (merged / "written").write_bytes(b"upper")  # writes land in the upper dir
            os.unlink(merged / "etc/new")
            assert (upper / "written").read_bytes() == b"upper"
            assert stat.S_ISCHR(os.lstat(upper / "etc/new").st_mode)
            assert (mnt / "top/etc/new").read_bytes() == b"top new\n"  # the layer is unchanged
        finally:
            subprocess.run(["umount", str(merged)], check=True, timeout=30)


@pytest.mark.usefixtures("in_repo")
def test_statfs_of_the_mount_reports_the_chunk_cache_filesystem(tmp_path: Path) -> None:
    """kubelet reads an image filesystem's capacity with statfs and warns InvalidDiskCapacity
    when it is zero; the mount reports the disk its chunks are cached on."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with running_mount(fake_server(mnt, cache), mnt):
        wait_for((mnt / "base").exists, 10, "the first layer")
        seen, disk = os.statvfs(mnt), os.statvfs(cache)
        assert seen.f_blocks * seen.f_frsize == disk.f_blocks * disk.f_frsize > 0
        assert seen.f_files == disk.f_files
        assert seen.f_bavail > 0 and seen.f_ffree > 0
        # Free space on a shared disk moves between the two calls; 1% leaves room for that.
        free, free_disk = seen.f_bavail * seen.f_frsize, disk.f_bavail * disk.f_frsize
        assert abs(free - free_disk) <= free_disk // 100, (seen, disk)
        df = subprocess.run(["df", "--output=size,avail", str(mnt)], capture_output=True,
                            text=True, check=True).stdout.split()
        assert int(df[-2]) > 0 and int(df[-1]) > 0, df
