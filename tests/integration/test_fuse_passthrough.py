"""FUSE passthrough on a real mount: a file whole and verified in the cache is opened onto its
backing copy, reads and mmaps return its bytes, and overlayfs (what containerd stacks on our
mount) still mounts on top. Skips, saying why, on a kernel that does not offer passthrough
(before 6.9, or built without CONFIG_FUSE_PASSTHROUGH, like Debian 12's 6.1)."""

from __future__ import annotations

import mmap
import os
import subprocess
from pathlib import Path

import pytest
import trio

from fusefs import LazyFilesystem, session
from fusefs.fuse.passthrough import Passthrough
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

pytestmark = [pytest.mark.root, pytest.mark.fuse]

BIG = os.urandom(3 << 20)  # over passthrough's 1 MiB minimum, in 48 chunks


def _read(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def _mapped(path: Path) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return bytes(m)


async def _until(predicate: object, what: str) -> None:
    with trio.fail_after(10):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.02)


@trio_test
async def test_a_whole_file_is_read_through_its_backing_copy_and_overlay_mounts_on_top(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = LazyFilesystem(mnt, tmp_path / "cache", single_layer=True, decoder=fake_decoder,
                        passthrough=True)
    index = FakeIndex([FakeEntry("big", content=BIG), FakeEntry("small", content=b"small\n")])
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)
        try:
            await fs.attach("base", FakeBlob(index.blob_bytes), index, background_fetch=False)
            passthrough = session.passthrough()
            if passthrough is None:
                pytest.skip(f"the kernel ({os.uname().release}) did not offer FUSE passthrough "
                            "at INIT (needs Linux >= 6.9 built with CONFIG_FUSE_PASSTHROUGH)")
            await _check(fs, mnt, tmp_path, passthrough)
        finally:
            fs.unmount()


async def _check(fs: LazyFilesystem, mnt: Path, tmp_path: Path, passthrough: Passthrough) -> None:
    # The first open finds the file cold: page-cache mode, and the read fills the cache.
    assert await trio.to_thread.run_sync(_read, mnt / "big") == BIG
    assert passthrough.passthrough_opens == 0
    await fs.writes_done()
    # Released, and whole in the cache: a copy is made after the next cached open.
    assert await trio.to_thread.run_sync(_read, mnt / "big") == BIG
    await _until(lambda: passthrough.copies == 1, "the backing copy")
    assert await trio.to_thread.run_sync(_read, mnt / "big") == BIG
    assert passthrough.passthrough_opens == 1
    assert await trio.to_thread.run_sync(_mapped, mnt / "big") == BIG
    assert passthrough.passthrough_opens == 2
    assert await trio.to_thread.run_sync(_read, mnt / "small") == b"small\n"  # below the minimum
    assert passthrough.backing_files == 1

    # overlayfs on top, as containerd mounts a container's rootfs: the stack depth we claimed
    # leaves room for it.
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    options = f"lowerdir={mnt},upperdir={upper},workdir={work}"
    # On a worker thread: overlayfs looks up the lower directory, which this very thread serves.
    await _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        assert await trio.to_thread.run_sync(_read, merged / "big") == BIG
        assert await trio.to_thread.run_sync(_mapped, merged / "big") == BIG
        assert passthrough.passthrough_opens == 4
    finally:
        await _run(["umount", str(merged)], check=False)


async def _run(command: list[str], *, check: bool) -> None:
    def run() -> None:
        subprocess.run(command, check=check, capture_output=True, timeout=30)

    await trio.to_thread.run_sync(run)
