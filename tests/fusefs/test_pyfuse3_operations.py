"""The pyfuse3 front end, called without a mount: type translation, the read-only rule, and
metadata answered while a read waits."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from fusefs.handlers import CACHE_TIMEOUT, WRITE_OPERATIONS
from fusefs.inodes import MOUNT_ROOT_INODE
from fusefs.pyfuse3_operations import Pyfuse3Operations
from tests.fusefs.test_handlers import operations
from tests.integration.fuse_support import FakeBlob, trio_test

CTX: Any = None  # the handlers never look at the request context

# Every operation pyfuse3 dispatches that would change the tree, with arguments of its shape.
PYFUSE3_WRITES = {
    "setattr": (2, None, None, None, CTX),
    "mknod": (1, b"n", 0o644, 0, CTX),
    "mkdir": (1, b"d", 0o755, CTX),
    "unlink": (1, b"f", CTX),
    "rmdir": (1, b"d", CTX),
    "symlink": (1, b"s", b"t", CTX),
    "rename": (1, b"a", 1, b"b", 0, CTX),
    "link": (2, 1, b"l", CTX),
    "write": (2, 0, b"x"),
    "create": (1, b"c", 0o644, os.O_WRONLY, CTX),
    "setxattr": (2, b"user.a", b"b", CTX),
    "removexattr": (2, b"user.a", CTX),
}


async def errno_of(awaitable: Awaitable[object]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await awaitable
    return info.value.errno


def test_every_write_pyfuse3_dispatches_is_in_the_one_table() -> None:
    assert set(PYFUSE3_WRITES) <= WRITE_OPERATIONS
    assert set(dir(pyfuse3.Operations)) & WRITE_OPERATIONS == set(PYFUSE3_WRITES)


@trio_test
async def test_writes_are_refused_with_erofs(tmp_path: Path) -> None:
    async with operations(tmp_path) as (handlers, _, _, _):
        ops = Pyfuse3Operations(handlers)
        for name, args in PYFUSE3_WRITES.items():
            assert await errno_of(getattr(ops, name)(*args)) == errno.EROFS, name
        assert await errno_of(ops.open(MOUNT_ROOT_INODE, os.O_RDWR, CTX)) == errno.EROFS


@trio_test
async def test_attributes_listing_and_errors_are_translated(tmp_path: Path) -> None:
    async with operations(tmp_path) as (handlers, inodes, index, _):
        ops = Pyfuse3Operations(handlers)
        layer_root = inodes.inode(1, 0)
        tool = await ops.lookup(inodes.inode(1, index.by_path["bin"]), b"tool", CTX)
        assert tool.st_ino == inodes.inode(1, index.by_path["bin/tool"])
        assert tool.st_mode == stat.S_IFREG | 0o4755 and tool.st_nlink == 2
        assert (tool.st_uid, tool.st_gid, tool.st_size, tool.st_blocks) == (7, 8, 18, 1)
        assert tool.entry_timeout == tool.attr_timeout == CACHE_TIMEOUT
        root = await ops.getattr(MOUNT_ROOT_INODE, CTX)
        assert stat.S_ISDIR(root.st_mode) and root.attr_timeout == 1.0
        info = await ops.open(tool.st_ino, os.O_RDONLY, CTX)
        assert info.fh == tool.st_ino and info.keep_cache
        assert await ops.read(info.fh, 3, 6) == b"bin/sh"
        assert await errno_of(ops.lookup(layer_root, b"nope", CTX)) == errno.ENOENT
        assert await errno_of(ops.getxattr(layer_root, b"user.x", CTX)) == pyfuse3.ENOATTR
        statfs = await ops.statfs(CTX)
        disk = os.statvfs(tmp_path)
        assert (statfs.f_blocks, statfs.f_files) == (disk.f_blocks, disk.f_files)
        assert statfs.f_bavail > 0 and statfs.f_namemax == 255
        assert await ops.access(layer_root, os.R_OK, CTX)


@trio_test
async def test_metadata_is_answered_while_a_read_waits(tmp_path: Path) -> None:
    async with operations(tmp_path) as (handlers, inodes, index, table):
        layer = table.get(1)
        assert layer is not None and isinstance(layer.blob, FakeBlob)
        layer.blob.gate = trio.Event()
        ops = Pyfuse3Operations(handlers)
        tool = inodes.inode(1, index.by_path["bin/tool"])
        read: list[bytes] = []

        async def read_tool() -> None:
            read.append(await ops.read(tool, 0, 100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_tool)
            with trio.fail_after(5):
                while not layer.blob.requests:
                    await trio.sleep(0.01)
                assert (await ops.getattr(tool, CTX)).st_ino == tool
                assert (await ops.lookup(inodes.inode(1, 0), b"bin", CTX)).st_mode & stat.S_IFDIR
            assert read == []  # still waiting on its blob
            layer.blob.gate.set()
        assert read == [b"#!/bin/sh\necho hi\n"]
