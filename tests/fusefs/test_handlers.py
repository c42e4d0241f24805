"""The request handlers called directly, without a mount: attributes, lookups, readdir, errors."""

from __future__ import annotations

import errno
import inspect
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher
from fusefs.fuse import abi as kp
from fusefs.fuse.abi import Attributes, Opcode
from fusefs.fuse.server import BUFFER_SIZE, ProtocolServer, RequestHandlers
from fusefs.handlers import CACHE_TIMEOUT, FuseReplyError, LazyHandlers, Opened
from fusefs.index import EntryKind
from fusefs.inodes import MOUNT_ROOT_INODE, InodeMap
from fusefs.layer import Layer
from fusefs.table import LayerTable
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

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
) -> AsyncIterator[tuple[LazyHandlers, InodeMap, FakeIndex, LayerTable]]:
    index = FakeIndex(ENTRIES)
    table = LayerTable()
    table.add(Layer("layer-a", 1, FakeBlob(index.blob_bytes), index))
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    inodes = InodeMap(single_layer=single)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, decoder=fake_decoder)
        yield LazyHandlers(table, fetcher, inodes, mount_time_ns=5), inodes, index, table
        nursery.cancel_scope.cancel()


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(FuseReplyError) as info:
        call()
    return info.value.errno


async def read_errno(awaitable: Awaitable[bytes]) -> int:
    with pytest.raises(FuseReplyError) as info:
        await awaitable
    return info.value.errno


def listing(ops: LazyHandlers, inode: int, start: int) -> list[tuple[bytes, Attributes, int]]:
    entries: list[tuple[bytes, Attributes, int]] = []

    def take(name: bytes, attributes: Attributes, next_id: int) -> bool:
        entries.append((name, attributes, next_id))
        return True

    ops.readdir(inode, start, take)
    return entries


@trio_test
async def test_mount_root_lists_layers_and_looks_them_up(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        root = ops.getattr(MOUNT_ROOT_INODE)
        assert stat.S_ISDIR(root.mode)
        listed = listing(ops, MOUNT_ROOT_INODE, 0)
        assert [(name, next_id) for name, _, next_id in listed] == [(b"layer-a", 1)]
        assert listing(ops, MOUNT_ROOT_INODE, 1) == []
        attrs = ops.lookup(MOUNT_ROOT_INODE, b"layer-a")
        assert attrs.ino == inodes.inode(1, 0)
        assert errno_of(lambda: ops.lookup(MOUNT_ROOT_INODE, b"nope")) == errno.ENOENT


@trio_test
async def test_metadata_of_entries(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, _):
        layer_root = inodes.inode(1, 0)
        bin_dir = ops.lookup(layer_root, b"bin")
        tool = ops.lookup(bin_dir.ino, b"tool")
        alias = ops.lookup(bin_dir.ino, b"alias")
        assert tool.ino == alias.ino == inodes.inode(1, index.by_path["bin/tool"])
        assert tool.mode == stat.S_IFREG | 0o4755 and tool.nlink == 2
        assert (tool.uid, tool.gid, tool.size) == (7, 8, 18)
        assert tool.entry_timeout == tool.attr_timeout == CACHE_TIMEOUT
        link = ops.lookup(layer_root, b"link")
        assert stat.S_ISLNK(link.mode) and ops.readlink(link.ino) == b"bin/tool"
        tmp = ops.lookup(layer_root, b"tmp")
        assert tmp.mode == stat.S_IFDIR | 0o1777
        assert ops.listxattr(tmp.ino) == [b"trusted.overlay.opaque"]
        assert ops.getxattr(tmp.ino, b"trusted.overlay.opaque") == b"y"
        assert errno_of(lambda: ops.getxattr(tmp.ino, b"user.x")) == errno.ENODATA
        gone = ops.lookup(layer_root, b"gone")
        assert stat.S_ISCHR(gone.mode) and gone.rdev == 0
        null = ops.lookup(layer_root, b"null")
        assert null.rdev == os.makedev(1, 3)
        assert (ops.lookup(bin_dir.ino, b"..")).ino == layer_root
        assert (ops.lookup(layer_root, b"..")).ino == MOUNT_ROOT_INODE


@trio_test
async def test_only_layer_listings_may_be_cached_by_the_kernel(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        layer_root = inodes.inode(1, 0)
        assert ops.opendir(layer_root) == Opened(fh=layer_root, keep_cache=True)
        bin_dir = ops.lookup(layer_root, b"bin").ino
        assert ops.opendir(bin_dir).keep_cache
        # The mount root lists the layers attached, which change.
        assert ops.opendir(MOUNT_ROOT_INODE) == Opened(fh=MOUNT_ROOT_INODE, keep_cache=False)
        tool = ops.lookup(bin_dir, b"tool").ino
        assert errno_of(lambda: ops.opendir(tool)) == errno.ENOTDIR


@trio_test
async def test_readdir_offsets_are_stable_and_resumable(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        layer_root = inodes.inode(1, 0)
        full = [(n, o) for n, _, o in listing(ops, layer_root, 0)]
        assert [n for n, _ in full] == [b"bin", b"link", b"tmp", b"gone", b"null"]
        resumed = [(n, o) for n, _, o in listing(ops, layer_root, full[1][1])]
        assert resumed == full[2:]


@trio_test
async def test_read_open_and_write_refusals(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, _):
        tool = inodes.inode(1, index.by_path["bin/tool"])
        info = ops.open(tool, os.O_RDONLY)
        assert info.fh == tool and info.keep_cache
        assert await ops.read(info.fh, 0, 100) == b"#!/bin/sh\necho hi\n"
        assert errno_of(lambda: ops.open(tool, os.O_WRONLY)) == errno.EROFS
        assert errno_of(lambda: ops.open(tool, os.O_RDWR)) == errno.EROFS
        assert errno_of(lambda: ops.open(tool, os.O_RDONLY | os.O_TRUNC)) == errno.EROFS
        assert errno_of(lambda: ops.access(tool, os.W_OK)) == errno.EROFS
        assert errno_of(lambda: ops.open(inodes.inode(1, 0), os.O_RDONLY)) == errno.EISDIR


@trio_test
async def test_unexpected_errors_become_eio_and_are_counted(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, table):
        layer = table.get(1)
        assert layer is not None
        tool = inodes.inode(1, index.by_path["bin/tool"])
        assert isinstance(layer.blob, FakeBlob)
        layer.blob.fail = True
        assert await read_errno(ops.read(tool, 0, 10)) == errno.EIO
        assert await read_errno(ops.read(tool, 0, 10)) == errno.EIO
        assert layer.stats.errors == 2
        assert len(layer.stats.logged) == 1  # logged once


@trio_test
async def test_stale_inodes_after_detach(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, table):
        table.remove("layer-a")
        assert errno_of(lambda: ops.getattr(inodes.inode(1, 0))) == errno.ESTALE
        assert errno_of(lambda: ops.getattr(12345)) == errno.ESTALE
        assert listing(ops, MOUNT_ROOT_INODE, 0) == []


@trio_test
async def test_single_layer_mode_serves_the_layer_at_the_root(tmp_path: Path) -> None:
    async with operations(tmp_path, single=True) as (ops, _, _, _):
        names = [n for n, _, _ in listing(ops, MOUNT_ROOT_INODE, 0)]
        assert names == [b"bin", b"link", b"tmp", b"gone", b"null"]
        assert (ops.lookup(MOUNT_ROOT_INODE, b"bin")).mode == stat.S_IFDIR | 0o755


def _close(a: int, b: int) -> bool:
    """Free counts of a shared disk move between two calls; 1% leaves room for that."""
    return abs(a - b) <= max(a, b) // 100 + 16


@trio_test
async def test_statfs_reports_the_chunk_cache_filesystem(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, _, _, _):
        st = ops.statfs()
        disk = os.statvfs(tmp_path)
        assert (st.blocks, st.files, st.frsize) == (disk.f_blocks, disk.f_files, disk.f_frsize)
        assert st.bavail > 0 and _close(st.bavail, disk.f_bavail), (st, disk)
        assert _close(st.bfree, disk.f_bfree) and _close(st.ffree, disk.f_ffree), (st, disk)
        assert st.namelen == 255


@trio_test
async def test_statfs_still_answers_when_the_cache_directory_is_gone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    async with operations(cache) as (ops, _, index, _):
        cache.rmdir()
        st = ops.statfs()
        assert st.files == index.entry_count + 1 and st.blocks > 0 and st.namelen == 255


@trio_test
async def test_unexpected_metadata_errors_become_eio_and_are_counted(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, table):
        layer = table.get(1)
        assert layer is not None
        tool = inodes.inode(1, index.by_path["bin/tool"])

        def broken(entry: int) -> dict[bytes, bytes]:
            raise RuntimeError("index bug")

        index.xattrs = broken  # type: ignore[method-assign]
        assert errno_of(lambda: ops.listxattr(tool)) == errno.EIO
        assert errno_of(lambda: ops.getxattr(tool, b"user.a")) == errno.EIO
        assert errno_of(lambda: ops.listxattr(tool)) == errno.EIO
        assert layer.stats.errors == 3
        assert len(layer.stats.logged) == 2  # once per (operation, entry, error type)
        assert ops.getattr(tool).ino == tool  # the layer still answers


def test_only_read_may_wait() -> None:
    """The protocol server answers every request but READ in its reader loop, so a handler that
    awaited would stall the mount; pyfuse3 would hide that. Every handler but read is plain."""
    served = {
        name for name, member in vars(RequestHandlers).items()
        if callable(member) and not name.startswith("_")
    }
    assert {"lookup", "getattr", "readdir", "open", "read", "statfs"} <= served
    waiting = {
        name for name in served
        if inspect.iscoroutinefunction(getattr(LazyHandlers, name))
        or inspect.isasyncgenfunction(getattr(LazyHandlers, name))
    }
    assert waiting == {"read"}


def _request(opcode: int, unique: int, nodeid: int, body: bytes = b"") -> bytes:
    return kp.encode_in_header(opcode, unique, nodeid, len(body)) + body


@trio_test
async def test_protocol_server_answers_metadata_while_a_read_waits(tmp_path: Path) -> None:
    """A READ stalled on its blob must not hold up lookups and getattrs behind it."""
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        async with operations(tmp_path) as (ops, inodes, index, table):
            layer = table.get(1)
            assert layer is not None and isinstance(layer.blob, FakeBlob)
            layer.blob.gate = trio.Event()
            tool = inodes.inode(1, index.by_path["bin/tool"])
            session = ProtocolServer(ops, server.fileno(), max_tasks=4)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                read_in = struct.pack("=QQIIQII", tool, 0, 100, 0, 0, 0, 0)
                requests = [
                    _request(Opcode.READ, 2, tool, read_in),
                    _request(Opcode.GETATTR, 4, tool, struct.pack("=IIQ", 0, 0, 0)),
                    _request(Opcode.LOOKUP, 6, inodes.inode(1, 0), b"bin\0"),
                ]
                for request in requests:
                    await trio.to_thread.run_sync(kernel.send, request)
                kernel.setblocking(False)
                answered: list[tuple[int, int, int]] = []
                with trio.fail_after(10):
                    while len(answered) < 2:
                        await trio.lowlevel.wait_readable(kernel)
                        answered.append(kp.parse_out_header(kernel.recv(BUFFER_SIZE)))
                assert sorted((unique, error) for _, error, unique in answered) == [(4, 0), (6, 0)]
                assert layer.blob.requests  # the READ is waiting on its blob meanwhile
                layer.blob.gate.set()
                with trio.fail_after(10):
                    await trio.lowlevel.wait_readable(kernel)
                    data = kernel.recv(BUFFER_SIZE)
                assert kp.parse_out_header(data)[1:] == (0, 2)
                assert data[kp.OUT_HEADER_SIZE :] == b"#!/bin/sh\necho hi\n"
                nursery.cancel_scope.cancel()
    finally:
        kernel.close()
        server.close()
