"""A layer answered before its index is built: lookups of it wait, without holding up other
layers, in the handlers and in both front ends; a build that fails answers EIO."""

from __future__ import annotations

import errno
import hashlib
import socket
import struct
from pathlib import Path

import pyfuse3
import pytest
import trio

from fusefs.formats import (
    ESTARGZ_TOC_DIGEST,
    LayerFormatError,
    build_index_off_loop,
    fetch_verified_toc,
)
from fusefs.fuse import abi as kp
from fusefs.fuse.abi import Opcode
from fusefs.fuse.server import BUFFER_SIZE, ProtocolServer
from fusefs.handlers import FuseReplyError, LayerPending
from fusefs.inodes import MOUNT_ROOT_INODE
from fusefs.layer import Layer
from fusefs.pending import PendingLayer
from fusefs.pyfuse3_operations import Pyfuse3Operations
from tests.fusefs.formats_support import MemoryBlob, estargz_blob
from tests.fusefs.test_handlers import listing, operations
from tests.integration.fuse_support import FakeBlob, trio_test

CTX = None


@trio_test
async def test_a_lookup_of_a_layer_being_built_waits_for_it_and_others_answer(
    tmp_path: Path,
) -> None:
    async with operations(tmp_path) as (ops, inodes, index, table):
        pending = PendingLayer("layer-b", 2, "sha256:" + "b" * 64)
        table.add_pending(pending)
        with pytest.raises(LayerPending) as info:
            ops.lookup(MOUNT_ROOT_INODE, b"layer-b")
        assert info.value.ready is pending.ready
        # The other layer answers meanwhile, and the root lists only what it can answer for.
        assert ops.lookup(MOUNT_ROOT_INODE, b"layer-a").ino == inodes.inode(1, 0)
        assert [name for name, _, _ in listing(ops, MOUNT_ROOT_INODE, 0)] == [b"layer-a"]
        assert table.free_slot() == 3  # the slot stays taken
        table.add(Layer("layer-b", 2, FakeBlob(index.blob_bytes), index))
        pending.ready.set()
        assert table.pending(b"layer-b") is None
        assert ops.lookup(MOUNT_ROOT_INODE, b"layer-b").ino == inodes.inode(2, 0)


@trio_test
async def test_a_layer_whose_build_failed_answers_eio(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, _, _, table):
        pending = PendingLayer("layer-b", 2, "sha256:" + "b" * 64)
        pending.failure = "LayerFormatError: bad entry"
        pending.ready.set()
        table.add_pending(pending)
        with pytest.raises(FuseReplyError) as info:
            ops.lookup(MOUNT_ROOT_INODE, b"layer-b")
        assert info.value.errno == errno.EIO and not isinstance(info.value, LayerPending)
        assert table.remove_pending("layer-b") is pending
        with pytest.raises(FuseReplyError) as gone:
            ops.lookup(MOUNT_ROOT_INODE, b"layer-b")
        assert gone.value.errno == errno.ENOENT


@trio_test
async def test_pyfuse3_answers_a_waiting_lookup_once_the_layer_is_built(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, index, table):
        front = Pyfuse3Operations(ops)
        pending = PendingLayer("layer-b", 2, "sha256:" + "b" * 64)
        table.add_pending(pending)
        answers: list[int] = []

        async def look() -> None:
            answers.append((await front.lookup(MOUNT_ROOT_INODE, b"layer-b", CTX)).st_ino)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look)
            await trio.sleep(0.05)
            assert answers == []  # waiting, not answered ENOENT or EIO
            other = await front.lookup(MOUNT_ROOT_INODE, b"layer-a", CTX)
            assert other.st_ino == inodes.inode(1, 0)
            table.add(Layer("layer-b", 2, FakeBlob(index.blob_bytes), index))
            pending.ready.set()
        assert answers == [inodes.inode(2, 0)]
        failed = PendingLayer("layer-c", 3, "sha256:" + "c" * 64)
        table.add_pending(failed)
        async with trio.open_nursery() as nursery:
            async def fail_later() -> None:
                await trio.sleep(0.05)
                failed.failure = "LayerFormatError: bad"
                failed.ready.set()

            nursery.start_soon(fail_later)
            with pytest.raises(pyfuse3.FUSEError) as info:
                await front.lookup(MOUNT_ROOT_INODE, b"layer-c", CTX)
            assert info.value.errno == errno.EIO


def _lookup(unique: int, name: bytes) -> bytes:
    body = name + b"\0"
    return kp.encode_in_header(Opcode.LOOKUP, unique, MOUNT_ROOT_INODE, len(body)) + body


@trio_test
async def test_the_protocol_server_answers_other_requests_while_a_lookup_waits(
    tmp_path: Path,
) -> None:
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    replies: dict[int, tuple[int, bytes]] = {}

    async def receive(count: int) -> None:
        with trio.fail_after(5):
            while len(replies) < count:
                await trio.lowlevel.wait_readable(kernel)
                data = kernel.recv(BUFFER_SIZE)
                _, error, unique = kp.parse_out_header(data)
                replies[unique] = (error, data[16:])

    try:
        kernel.setblocking(False)
        async with operations(tmp_path) as (ops, inodes, index, table):
            building = PendingLayer("layer-b", 2, "sha256:" + "b" * 64)
            failing = PendingLayer("layer-c", 3, "sha256:" + "c" * 64)
            table.add_pending(building)
            table.add_pending(failing)
            session = ProtocolServer(ops, server.fileno(), max_tasks=4)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                for request in (_lookup(2, b"layer-b"), _lookup(4, b"layer-c"),
                                _lookup(6, b"layer-a")):
                    kernel.send(request)
                await receive(1)
                await trio.sleep(0.05)
                assert sorted(replies) == [6]  # layer-a answered while the others wait
                failing.failure = "LayerFormatError: bad entry"
                failing.ready.set()
                await receive(2)
                assert replies[4][0] == -errno.EIO
                table.add(Layer("layer-b", 2, FakeBlob(index.blob_bytes), index))
                building.ready.set()
                await receive(3)
                nursery.cancel_scope.cancel()
            error, payload = replies[2]
            assert error == 0 and struct.unpack_from("=Q", payload)[0] == inodes.inode(2, 0)
    finally:
        kernel.close()
        server.close()


def test_a_toc_matching_its_digest_is_checked_before_its_hostile_entries_are_built() -> None:
    # The digest vouches for the TOC's bytes, not for its entries: the check passes (what a
    # Prepare answers on), the build refuses the entries (what the layer then reports as EIO).
    raw = b'{"version": 1, "entries": [{"name": "../escape", "type": "reg", "size": 1}]}'
    blob = MemoryBlob(estargz_blob(raw_json=raw))
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()

    async def main() -> None:
        toc = await fetch_verified_toc(blob, annotations={ESTARGZ_TOC_DIGEST: digest})
        assert toc.trusted and toc.json_digest == digest
        with pytest.raises(LayerFormatError):
            await build_index_off_loop(toc)
        with pytest.raises(LayerFormatError, match="digest mismatch"):
            await fetch_verified_toc(blob, annotations={ESTARGZ_TOC_DIGEST: "sha256:" + "0" * 64})

    trio.run(main)
