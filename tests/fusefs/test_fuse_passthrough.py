"""FUSE passthrough without a kernel: INIT negotiation and its fallback, the OPEN answers, and
the backing copies, with the protocol server driven over a socketpair and a fake ioctl table."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from fusefs.cache import ChunkIntegrityError
from fusefs.fuse import abi as kp
from fusefs.fuse.abi import Opcode
from fusefs.fuse.passthrough import (
    CACHED_FH,
    PASSTHROUGH_FH,
    HandoverError,
    Opening,
    Passthrough,
)
from fusefs.fuse.server import BUFFER_SIZE, ProtocolServer
from fusefs.handlers import FuseReplyError, WholeFile
from tests.fusefs.test_fuse_server import Handlers

CONTENT = os.urandom(3000)
DEBIAN_6_1_OFFER = kp.FUSE_ASYNC_READ | kp.FUSE_NO_OPEN_SUPPORT | kp.FUSE_INIT_EXT  # no flags2
PASSTHROUGH_OFFER = DEBIAN_6_1_OFFER | kp.FUSE_PASSTHROUGH


class FakeRegistry:
    """The kernel's backing-file table: records what each registered fd held."""

    def __init__(self) -> None:
        self.opened: dict[int, bytes] = {}
        self.closed: list[int] = []

    def open(self, fd: int) -> int:
        backing_id = 7 + len(self.opened)
        self.opened[backing_id] = os.pread(fd, 1 << 20, 0)
        return backing_id

    def close(self, backing_id: int) -> None:
        self.closed.append(backing_id)


class Files:
    """whole_file and file_identity over a dict inode -> content; ``bad`` pieces fail."""

    def __init__(self, files: dict[int, bytes]) -> None:
        self.files = files
        self.names = {inode: ("sha256:layer", inode) for inode in files}
        self.bad: set[int] = set()

    def whole_file(self, inode: int) -> WholeFile | None:
        content = self.files.get(inode)
        if content is None:
            return None
        bad = inode in self.bad

        async def pieces() -> AsyncIterator[bytes]:
            yield content[:1000]
            if bad:
                raise ChunkIntegrityError("chunk digest mismatch")
            yield content[1000:]

        return WholeFile(len(content), pieces, self.names[inode])

    def file_identity(self, inode: int) -> tuple[str, int] | None:
        return self.names.get(inode)


def _passthrough(tmp_path: Path, files: Files, registry: FakeRegistry, **kwargs: int) -> Passthrough:
    return Passthrough(registry, files.whole_file, files.file_identity, tmp_path,
                       min_size=kwargs.pop("min_size", 100), **kwargs)


def _request(opcode: int, unique: int, nodeid: int, body: bytes = b"") -> bytes:
    return kp.encode_in_header(opcode, unique, nodeid, len(body)) + body


def _open(unique: int, nodeid: int = 2) -> bytes:
    return _request(Opcode.OPEN, unique, nodeid, struct.pack("=II", os.O_RDONLY, 0))


def _release(unique: int, fh: int, nodeid: int = 2) -> bytes:
    return _request(Opcode.RELEASE, unique, nodeid, struct.pack("=QIIQ", fh, 0, 0, 0))


Ask = Callable[[bytes], Awaitable[tuple[int, bytes]]]


def _converse(passthrough: Passthrough | None, script: Callable[[Ask], Awaitable[None]]) -> None:
    """Serve one connection and run ``script``, which sends a request and gets its reply."""
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def main() -> None:
        session = ProtocolServer(Handlers(), server.fileno(), max_tasks=4, passthrough=passthrough)
        kernel.setblocking(False)

        async def ask(request: bytes) -> tuple[int, bytes]:
            kernel.send(request)
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(kernel)
            data = kernel.recv(BUFFER_SIZE)
            _, error, unique = kp.parse_out_header(data)
            assert unique == kp.parse_in_header(request).unique
            return error, data[kp.OUT_HEADER_SIZE :]

        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            await script(ask)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        kernel.close()
        server.close()


def _init_out(payload: bytes) -> tuple[int, ...]:
    return struct.unpack("=IIIIHHIIHHI7I", payload)


async def _until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


def test_passthrough_is_taken_when_offered_and_files_switch_once_whole(tmp_path: Path) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry)

    async def script(ask: Ask) -> None:
        error, init = await ask(_request(Opcode.INIT, 2, 0, kp.encode_init_in(41, 131072,
                                                                            PASSTHROUGH_OFFER)))
        fields = _init_out(init)
        assert error == 0 and fields[3] & kp.FUSE_INIT_EXT
        assert fields[10] << 32 == kp.FUSE_PASSTHROUGH  # flags2
        assert fields[11] == 1  # max_stack_depth: overlayfs still fits on top (limit 2)
        # OPEN is answered (no zero-message opens): the first open is from the page cache and
        # starts the copy.
        assert await ask(_open(4)) == (0, kp.encode_open_out(CACHED_FH, kp.FOPEN_KEEP_CACHE))
        await _until(lambda: passthrough.copies == 1)
        assert registry.opened == {7: CONTENT}  # the fd handed over holds the verified bytes
        # A cached open of the inode is still there: the kernel would refuse passthrough.
        assert await ask(_open(6)) == (0, kp.encode_open_out(CACHED_FH, kp.FOPEN_KEEP_CACHE))
        assert await ask(_release(8, CACHED_FH)) == (0, b"")
        assert await ask(_release(10, CACHED_FH)) == (0, b"")
        pt = kp.encode_open_out(PASSTHROUGH_FH, kp.FOPEN_PASSTHROUGH, 7)
        assert await ask(_open(12)) == (0, pt)
        assert await ask(_open(14)) == (0, pt)  # the same backing file while it is in use
        assert await ask(_request(Opcode.FLUSH, 16, 2, b"\0" * 24)) == (-errno.ENOSYS, b"")
        assert await ask(_open(18, nodeid=3)) == (  # not whole: the page cache, no copy
            0, kp.encode_open_out(CACHED_FH, kp.FOPEN_KEEP_CACHE))
        assert passthrough.copies == 1 and passthrough.passthrough_opens == 2

    _converse(passthrough, script)


@pytest.mark.parametrize("offer", [
    DEBIAN_6_1_OFFER,
    kp.FUSE_ASYNC_READ | kp.FUSE_NO_OPEN_SUPPORT,  # no FUSE_INIT_EXT: flags2 means nothing
], ids=["debian-6.1", "no-init-ext"])
def test_without_the_offer_the_server_falls_back_to_zero_message_opens(
    tmp_path: Path, offer: int
) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry)
    init_in = kp.encode_init_in(38, 131072, offer)
    if not offer & kp.FUSE_INIT_EXT:
        init_in = init_in[:16] + struct.pack("=I", 1 << 5) + init_in[20:]  # noise in flags2

    async def script(ask: Ask) -> None:
        error, init = await ask(_request(Opcode.INIT, 2, 0, init_in))
        fields = _init_out(init)
        assert error == 0 and fields[10] == 0 and fields[11] == 0  # no flags2, no stack depth
        assert not fields[3] & kp.FUSE_INIT_EXT
        assert await ask(_open(4)) == (-errno.ENOSYS, b"")  # files open without a round trip
        await trio.sleep(0.05)

    _converse(passthrough, script)
    assert registry.opened == {} and passthrough.copies == 0


def test_passthrough_off_is_never_asked_for(tmp_path: Path) -> None:
    async def script(ask: Ask) -> None:
        _, init = await ask(_request(Opcode.INIT, 2, 0, kp.encode_init_in(41, 131072,
                                                                        PASSTHROUGH_OFFER)))
        assert _init_out(init)[10:12] == (0, 0)
        assert await ask(_open(4)) == (-errno.ENOSYS, b"")

    _converse(None, script)


def _run_copies(passthrough: Passthrough, opens: Callable[[], None],
                done: Callable[[], bool] = lambda: True) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            passthrough.start(nursery)
            opens()
            await _until(done)
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        passthrough.start(None)

    trio.run(main)


def test_a_copy_that_fails_verification_is_never_handed_over(tmp_path: Path) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    files.bad.add(2)
    passthrough = _passthrough(tmp_path, files, registry)
    _run_copies(passthrough, lambda: passthrough.open(2))
    assert registry.opened == {} and passthrough.copies == 0
    passthrough.release(2, CACHED_FH)
    assert passthrough.open(2).backing_id is None  # and it is not tried again
    assert os.listdir(tmp_path) == []  # nothing left on disk: the copy had no name


def test_small_files_are_not_copied(tmp_path: Path) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry, min_size=len(CONTENT) + 1)
    _run_copies(passthrough, lambda: passthrough.open(2))
    assert registry.opened == {}


def test_a_copy_is_never_served_for_an_inode_that_names_another_file(tmp_path: Path) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry)
    _run_copies(passthrough, lambda: passthrough.open(2), lambda: passthrough.copies == 1)
    passthrough.release(2, CACHED_FH)
    files.names[2] = ("sha256:another-layer", 2)
    assert passthrough.open(2).backing_id is None
    assert registry.closed == [7]


def test_the_budget_drops_unused_copies_first(tmp_path: Path) -> None:
    files = Files({2: CONTENT, 3: CONTENT[::-1], 4: CONTENT[:2500]})
    registry = FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry, budget=2 * len(CONTENT))

    for inode in (2, 3):  # one after the other, so that the backing ids are known
        _run_copies(passthrough, lambda i=inode: passthrough.open(i),
                    lambda i=inode: passthrough.copies == i - 1)
        passthrough.release(inode, CACHED_FH)
    assert passthrough.open(2).backing_id == 7  # in use: 3 is the one to go
    _run_copies(passthrough, lambda: passthrough.open(4), lambda: passthrough.copies == 3)
    assert registry.closed == [8]
    assert passthrough.open(3).backing_id is None


def test_an_inode_renamed_under_an_open_passthrough_file_gets_eio(tmp_path: Path) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry)
    _run_copies(passthrough, lambda: passthrough.open(2), lambda: passthrough.copies == 1)
    passthrough.release(2, CACHED_FH)
    assert passthrough.open(2).backing_id == 7
    files.names[2] = ("sha256:another-layer", 2)
    with pytest.raises(FuseReplyError) as info:
        passthrough.open(2)
    assert info.value.errno == errno.EIO


def test_the_next_daemon_answers_opens_as_the_one_that_handed_over_would(
    tmp_path: Path,
) -> None:
    files, registry = Files({2: CONTENT, 3: CONTENT[::-1]}), FakeRegistry()
    before = _passthrough(tmp_path, files, registry)
    for inode in (2, 3):
        _run_copies(before, lambda i=inode: before.open(i),
                    lambda i=inode: before.copies == i - 1)
    before.release(2, CACHED_FH)
    assert before.open(2).backing_id == 7  # inode 2 open in passthrough; 3 in page-cache mode
    state = json.loads(json.dumps(before.handover_state()))  # as it travels through the keeper

    after = _passthrough(tmp_path, files, registry)
    after.adopt(state)
    assert after.backing_files == 2
    # The kernel refuses a page-cache open of an inode open in passthrough, and the reverse.
    assert after.open(2) == Opening(PASSTHROUGH_FH, 7)
    assert after.open(3) == Opening(CACHED_FH, None)
    # The predecessor's opens end with RELEASEs carrying its handles: then 3 switches.
    after.release(3, CACHED_FH)
    after.release(3, CACHED_FH)
    assert after.open(3) == Opening(PASSTHROUGH_FH, 8)
    assert registry.closed == []  # the predecessor's backing ids are the ones in use


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"backing": {}},
        {"backing": [[2, 7, 10, "sha256:layer"]]},
        {"backing": [[2, -7, 10, "sha256:layer", 2]]},
        {"backing": [[2, 7, 10, 5, 2]]},
        {"opens": [[2, 1]]},
        {"opens": [[2, 1, True]]},
    ],
)
def test_a_malformed_handover_is_refused_whole(tmp_path: Path, state: object) -> None:
    files, registry = Files({2: CONTENT}), FakeRegistry()
    passthrough = _passthrough(tmp_path, files, registry)
    with pytest.raises(HandoverError):
        passthrough.adopt(state)
    assert passthrough.backing_files == 0


def test_a_daemon_with_passthrough_off_serves_adopted_copies_and_makes_none(
    tmp_path: Path,
) -> None:
    files, registry = Files({2: CONTENT, 3: CONTENT[::-1]}), FakeRegistry()
    passthrough = Passthrough(registry, files.whole_file, files.file_identity, tmp_path,
                              min_size=100, new_copies=False)
    passthrough.adopt({"backing": [[2, 7, len(CONTENT), "sha256:layer", 2]], "opens": []})
    assert passthrough.open(2) == Opening(PASSTHROUGH_FH, 7)
    _run_copies(passthrough, lambda: passthrough.open(3))
    assert registry.opened == {} and passthrough.open(3).backing_id is None
