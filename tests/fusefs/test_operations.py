"""The pyfuse3 handlers called directly (no mount): attributes, lookups, readdir, errors."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher
from fusefs.index import EntryKind
from fusefs.inodes import MOUNT_ROOT_INODE, InodeMap
from fusefs.layer import Layer
from fusefs.operations import CACHE_TIMEOUT, LazyOperations
from fusefs.table import LayerTable
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

CTX: Any = None  # the handlers never look at the request context

ENTRIES = [
    FakeEntry("bin", kind=EntryKind.DIR, perm=0o755),
    FakeEntry("bin/tool", perm=0o4755, content=b"#!/bin/sh\necho hi\n", uid=7, gid=8),
    FakeEntry("bin/alias", hardlink_to="bin/tool"),
    FakeEntry("link", kind=EntryKind.SYMLINK, perm=0o777, target=b"bin/tool"),
    FakeEntry("tmp", kind=EntryKind.DIR, perm=0o1777, xattrs={b"trusted.overlay.opaque": b"y"}),
    FakeEntry("gone", kind=EntryKind.CHAR, perm=0o000, rdev=0),
    FakeEntry("null", kind=EntryKind.CHAR, perm=0o666, rdev=os.makedev(1, 3)),
]


@asynccontextmanager
async def operations(
    tmp_path: Path, *, single: bool = False
) -> AsyncIterator[tuple[LazyOperations, InodeMap, FakeIndex, LayerTable]]:
    index = FakeIndex(ENTRIES)
    table = LayerTable()
    table.add(Layer("layer-a", 1, FakeBlob(index.blob_bytes), index))
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    inodes = InodeMap(single_layer=single)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, decoder=fake_decoder)
        yield LazyOperations(table, fetcher, inodes, mount_time_ns=5), inodes, index, table
        nursery.cancel_scope.cancel()


async def errno_of(awaitable: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await awaitable
    return info.value.errno


@trio_test
async def test_mount_root_lists_layers_and_looks_them_up(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        root = await ops.getattr(MOUNT_ROOT_INODE, CTX)
        assert stat.S_ISDIR(root.st_mode)
        listed = list(ops.directory_entries(MOUNT_ROOT_INODE, 0))
        assert [(name, next_id) for name, _, next_id in listed] == [(b"layer-a", 1)]
        assert list(ops.directory_entries(MOUNT_ROOT_INODE, 1)) == []
        attrs = await ops.lookup(MOUNT_ROOT_INODE, b"layer-a", CTX)
        assert attrs.st_ino == inodes.inode(1, 0)
        assert await errno_of(ops.lookup(MOUNT_ROOT_INODE, b"nope", CTX)) == errno.ENOENT


@trio_test
async def test_metadata_of_entries(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, _):
        layer_root = inodes.inode(1, 0)
        bin_dir = await ops.lookup(layer_root, b"bin", CTX)
        tool = await ops.lookup(bin_dir.st_ino, b"tool", CTX)
        alias = await ops.lookup(bin_dir.st_ino, b"alias", CTX)
        assert tool.st_ino == alias.st_ino == inodes.inode(1, index.by_path["bin/tool"])
        assert tool.st_mode == stat.S_IFREG | 0o4755 and tool.st_nlink == 2
        assert (tool.st_uid, tool.st_gid, tool.st_size) == (7, 8, 18)
        assert tool.entry_timeout == tool.attr_timeout == CACHE_TIMEOUT
        link = await ops.lookup(layer_root, b"link", CTX)
        assert stat.S_ISLNK(link.st_mode) and await ops.readlink(link.st_ino, CTX) == b"bin/tool"
        tmp = await ops.lookup(layer_root, b"tmp", CTX)
        assert tmp.st_mode == stat.S_IFDIR | 0o1777
        assert await ops.listxattr(tmp.st_ino, CTX) == [b"trusted.overlay.opaque"]
        assert await ops.getxattr(tmp.st_ino, b"trusted.overlay.opaque", CTX) == b"y"
        assert await errno_of(ops.getxattr(tmp.st_ino, b"user.x", CTX)) == pyfuse3.ENOATTR
        gone = await ops.lookup(layer_root, b"gone", CTX)
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
        null = await ops.lookup(layer_root, b"null", CTX)
        assert null.st_rdev == os.makedev(1, 3)
        assert (await ops.lookup(bin_dir.st_ino, b"..", CTX)).st_ino == layer_root
        assert (await ops.lookup(layer_root, b"..", CTX)).st_ino == MOUNT_ROOT_INODE


@trio_test
async def test_readdir_offsets_are_stable_and_resumable(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        layer_root = inodes.inode(1, 0)
        full = [(n, o) for n, _, o in ops.directory_entries(layer_root, 0)]
        assert [n for n, _ in full] == [b"bin", b"link", b"tmp", b"gone", b"null"]
        resumed = [(n, o) for n, _, o in ops.directory_entries(layer_root, full[1][1])]
        assert resumed == full[2:]


@trio_test
async def test_read_open_and_write_refusals(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, _):
        tool = inodes.inode(1, index.by_path["bin/tool"])
        info = await ops.open(tool, os.O_RDONLY, CTX)
        assert info.fh == tool and info.keep_cache
        assert await ops.read(info.fh, 0, 100) == b"#!/bin/sh\necho hi\n"
        assert await errno_of(ops.open(tool, os.O_WRONLY, CTX)) == errno.EROFS
        assert await errno_of(ops.open(tool, os.O_RDWR, CTX)) == errno.EROFS
        assert await errno_of(ops.unlink(inodes.inode(1, 0), b"link", CTX)) == errno.EROFS
        assert await errno_of(ops.mkdir(inodes.inode(1, 0), b"x", 0o755, CTX)) == errno.EROFS
        assert await errno_of(ops.write(tool, 0, b"x")) == errno.EROFS
        assert await errno_of(ops.setxattr(tool, b"user.a", b"b", CTX)) == errno.EROFS
        assert await errno_of(ops.open(inodes.inode(1, 0), os.O_RDONLY, CTX)) == errno.EISDIR


@trio_test
async def test_unexpected_errors_become_eio_and_are_counted(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, table):
        layer = table.get(1)
        assert layer is not None
        tool = inodes.inode(1, index.by_path["bin/tool"])
        assert isinstance(layer.blob, FakeBlob)
        layer.blob.fail = True
        assert await errno_of(ops.read(tool, 0, 10)) == errno.EIO
        assert await errno_of(ops.read(tool, 0, 10)) == errno.EIO
        assert layer.stats.errors == 2
        assert len(layer.stats.logged) == 1  # logged once


@trio_test
async def test_stale_inodes_after_detach(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, table):
        table.remove("layer-a")
        assert await errno_of(ops.getattr(inodes.inode(1, 0), CTX)) == errno.ESTALE
        assert await errno_of(ops.getattr(12345, CTX)) == errno.ESTALE
        assert list(ops.directory_entries(MOUNT_ROOT_INODE, 0)) == []


@trio_test
async def test_single_layer_mode_serves_the_layer_at_the_root(tmp_path: Path) -> None:
    async with operations(tmp_path, single=True) as (ops, _, _, _):
        names = [n for n, _, _ in ops.directory_entries(MOUNT_ROOT_INODE, 0)]
        assert names == [b"bin", b"link", b"tmp", b"gone", b"null"]
        assert (await ops.lookup(MOUNT_ROOT_INODE, b"bin", CTX)).st_mode == stat.S_IFDIR | 0o755


@trio_test
async def test_statfs_answers(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, _, index, _):
        st = await ops.statfs(CTX)
        assert st.f_files == index.entry_count + 1 and st.f_namemax == 255
