"""Layers attached before their index is built, over a real mount with both front ends: a
lookup waits for the build and other layers answer meanwhile; a failed build answers EIO;
a layer removed while building disappears."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from fusefs import LayerFormatError, LazyFilesystem
from fusefs.index import EntryKind, LayerIndex
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

pytestmark = [pytest.mark.root, pytest.mark.fuse]

CONTENT = b"built after the answer\n"
_T = TypeVar("_T")


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _errno_of_stat(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


async def _in_thread(fn: Callable[[Path], _T], path: Path) -> _T:
    # Never on the trio thread: it serves the mount. A thread stuck in a lookup is abandoned
    # when the test fails, so that a broken build fails the test instead of hanging it.
    return await trio.to_thread.run_sync(fn, path, abandon_on_cancel=True)


async def _until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.02)


@pytest.mark.parametrize("libfuse", [False, True], ids=["protocol-server", "pyfuse3"])
@trio_test
async def test_lookups_wait_for_the_build_and_a_failed_build_answers_eio(
    tmp_path: Path, libfuse: bool
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fs = LazyFilesystem(mnt, tmp_path / "cache", decoder=fake_decoder, libfuse=libfuse)
    ready = FakeIndex([FakeEntry("ready", content=b"ready\n")])
    later = FakeIndex([FakeEntry("bin", kind=EntryKind.DIR, perm=0o755),
                       FakeEntry("bin/tool", content=CONTENT)])
    release = trio.Event()

    async def slow_build() -> LayerIndex:
        await release.wait()
        return later

    async def hostile_build() -> LayerIndex:
        raise LayerFormatError("TOC entry '../escape' leaves the layer")

    async def never_build() -> LayerIndex:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(fs.run)
            await fs.attach("ready", FakeBlob(ready.blob_bytes), ready, background_fetch=False)
            # Looked up once, as overlayfs does when it mounts: the kernel keeps the entry. A
            # lookup at the mount root itself may queue behind the waiting one under pyfuse3.
            await _in_thread(os.stat, mnt / "ready")

            slot = fs.attach_building("later", FakeBlob(later.blob_bytes), slow_build,
                                      background_fetch=False)
            assert fs.slot_of("later") == slot and fs.is_building("later")
            got: list[bytes] = []

            async def read_later() -> None:
                got.append(await _in_thread(_read, mnt / "later/bin/tool"))

            nursery.start_soon(read_later)
            await trio.sleep(0.2)
            assert got == []  # waiting for the index, not answered ENOENT
            assert await _in_thread(_read, mnt / "ready/ready") == b"ready\n"  # not blocked
            release.set()
            await _until(lambda: bool(got))
            assert got == [CONTENT]
            assert await fs.wait_built("later") is None and not fs.is_building("later")

            fs.attach_building("hostile", FakeBlob(later.blob_bytes), hostile_build,
                               background_fetch=False)
            assert "../escape" in (await fs.wait_built("hostile") or "")
            for path in (mnt / "hostile", mnt / "hostile/bin/tool"):
                assert await _in_thread(_errno_of_stat, path) == errno.EIO
            assert fs.snapshot().index_build_failures == 1
            assert [p.layer_id for p in fs.pending_layers()] == ["hostile"]
            assert await _in_thread(_read, mnt / "ready/ready") == b"ready\n"

            fs.attach_building("dropped", FakeBlob(later.blob_bytes), never_build,
                               background_fetch=False)
            errnos: list[int] = []

            async def stat_dropped() -> None:
                errnos.append(await _in_thread(_errno_of_stat, mnt / "dropped"))

            nursery.start_soon(stat_dropped)
            await trio.sleep(0.2)
            await fs.detach("dropped")
            await fs.detach("hostile")
            await _until(lambda: bool(errnos))
            assert errnos == [errno.ENOENT]
            assert fs.pending_layers() == []
            assert sorted(await _in_thread(os.listdir, mnt)) == ["later", "ready"]
            fs.unmount()
