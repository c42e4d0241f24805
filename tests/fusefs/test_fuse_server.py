"""The FUSE wire structs: sizes from <linux/fuse.h>, field placement, and the protocol server's
dispatch driven over a socketpair standing in for /dev/fuse."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fusefs.fuse import abi as kp
from fusefs.fuse.abi import Attributes, Opcode, StatfsReply
from fusefs.fuse.server import BUFFER_SIZE, IN_PLACE_BURST, ProtocolServer
from fusefs.handlers import DirectoryEntrySink, FuseReplyError, Opened

ATTRS = Attributes(
    ino=(3 << 32) | 7, mode=stat.S_IFREG | 0o644, nlink=2, uid=1000, gid=100,
    rdev=os.makedev(1, 3), size=12345, blocks=25, blksize=131072,
    atime_ns=1_700_000_000_123_456_789, mtime_ns=1_700_000_001_000_000_001,
    ctime_ns=1_700_000_002_999_999_999, generation=0, entry_timeout=86400.0, attr_timeout=1.5,
)


def test_struct_sizes_match_the_uapi_header() -> None:
    assert kp.IN_HEADER_SIZE == 40
    assert kp.OUT_HEADER_SIZE == 16
    assert kp.ATTR_SIZE == 88
    assert kp.ENTRY_OUT_SIZE == 128
    assert kp.ATTR_OUT_SIZE == 104
    assert kp.READ_IN_SIZE == 40
    assert kp.STATFS_OUT_SIZE == 80
    assert kp.INIT_OUT_SIZE == 64
    assert kp.DIRENT_HEAD_SIZE == 24
    assert len(kp.encode_open_out(1, 2)) == 16
    assert len(kp.encode_xattr_size(3)) == 8
    assert len(kp.encode_init_in(38, 0, 0)) == 64


def test_in_header_roundtrip_and_length_check() -> None:
    raw = kp.encode_in_header(Opcode.LOOKUP, 42, 1, 4, uid=5, gid=6, pid=7) + b"abc\0"
    header = kp.parse_in_header(raw)
    assert header == kp.InHeader(44, Opcode.LOOKUP, 42, 1, 5, 6, 7)
    with pytest.raises(kp.ProtocolError):
        kp.parse_in_header(raw[:-1])  # len says 44
    with pytest.raises(kp.ProtocolError):
        kp.parse_in_header(raw[:20])


def test_replies_carry_length_error_and_unique() -> None:
    out = kp.reply(9, b"abcd", b"ef")
    assert kp.parse_out_header(out) == (22, 0, 9) and out[16:] == b"abcdef"
    err = kp.error_reply(11, errno.ENOENT)
    assert kp.parse_out_header(err) == (16, -errno.ENOENT, 11) and len(err) == 16
    with pytest.raises(ValueError):
        kp.error_reply(1, 0)
    with pytest.raises(ValueError):
        kp.error_reply(1, 512)  # the kernel accepts (-512, 0] only


def test_attr_fields_are_where_the_kernel_reads_them() -> None:
    (ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid,
     gid, rdev, blksize, flags) = struct.unpack("=QQQQQQIIIIIIIIII", kp.encode_attr(ATTRS))
    assert (ino, size, blocks) == (ATTRS.ino, 12345, 25)
    assert (atime, atimensec) == (1_700_000_000, 123_456_789)
    assert (mtime, mtimensec) == (1_700_000_001, 1)
    assert (ctime, ctimensec) == (1_700_000_002, 999_999_999)
    assert (mode, nlink, uid, gid, blksize, flags) == (ATTRS.mode, 2, 1000, 100, 131072, 0)
    assert os.major(rdev) == 1 and os.minor(rdev) == 3  # glibc's dev_t low 32 bits
    # Layers report one time for all three, which takes a shorter path.
    same = Attributes(**{**_fields(ATTRS), "atime_ns": -1, "mtime_ns": -1, "ctime_ns": -1})
    times = struct.unpack("=QQQQQQIIIIIIIIII", kp.encode_attr(same))[3:9]
    assert times == ((1 << 64) - 1,) * 3 + (999_999_999,) * 3


def test_entry_and_attr_out_timeouts() -> None:
    entry = kp.encode_entry_out(ATTRS)
    nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec = struct.unpack_from(
        "=QQQQII", entry
    )
    assert (nodeid, generation) == (ATTRS.ino, 0)
    assert (entry_valid, entry_nsec) == (86400, 0)
    assert (attr_valid, attr_nsec) == (1, 500_000_000)
    assert entry[40:] == kp.encode_attr(ATTRS)
    attr_out = kp.encode_attr_out(ATTRS)
    assert struct.unpack_from("=QII", attr_out) == (1, 500_000_000, 0)
    assert attr_out[16:] == kp.encode_attr(ATTRS)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_split_timeout_never_overflows(seconds: float) -> None:
    sec, nsec = kp.split_timeout(seconds)
    assert 0 <= sec < 1 << 64 and 0 <= nsec < 1_000_000_000
    if 0 <= seconds < 1e9:
        assert abs(sec + nsec / 1e9 - seconds) < 1e-6


def test_dirents_are_padded_to_eight_bytes() -> None:
    for name in (b"a", b"abcdefgh", b"caf\xc3\xa9", b"x" * 255):
        d = kp.encode_dirent(99, 5, stat.S_IFDIR | 0o755, name)
        assert len(d) % 8 == 0 and len(d) == kp.dirent_size(name)
        ino, off, namelen, dtype = struct.unpack_from("=QQII", d)
        assert (ino, off, namelen, dtype) == (99, 5, len(name), 4)  # DT_DIR
        assert d[24 : 24 + len(name)] == name and d[24 + len(name) :].strip(b"\0") == b""
        plus = kp.encode_direntplus(ATTRS, 7, name)
        assert len(plus) == kp.direntplus_size(name)
        assert plus[:128] == kp.encode_entry_out(ATTRS)
        assert struct.unpack_from("=QQII", plus, 128) == (ATTRS.ino, 7, len(name), 8)  # DT_REG


def test_request_bodies() -> None:
    read = struct.pack("=QQIIQII", 77, 4096, 131072, 0, 0, os.O_RDONLY, 0)
    assert kp.parse_read_in(read) == kp.ReadIn(77, 4096, 131072, os.O_RDONLY)
    with pytest.raises(kp.ProtocolError):
        kp.parse_read_in(read[:39])
    assert kp.parse_open_in(struct.pack("=II", os.O_RDONLY | os.O_NOFOLLOW, 0)) == (
        os.O_RDONLY | os.O_NOFOLLOW
    )
    assert kp.parse_getxattr_in(struct.pack("=II", 0, 0) + b"user.note\0") == (0, b"user.note")
    assert kp.parse_getxattr_in(struct.pack("=II", 64, 0)) == (64, b"")
    assert kp.parse_name(b"name\0") == b"name"
    with pytest.raises(kp.ProtocolError):
        kp.parse_name(b"no terminator")
    assert kp.parse_forget_in(struct.pack("=Q", 3)) == 3
    batch = struct.pack("=II", 2, 0) + struct.pack("=QQ", 10, 1) + struct.pack("=QQ", 11, 2)
    assert kp.parse_batch_forget_in(batch) == [(10, 1), (11, 2)]
    with pytest.raises(kp.ProtocolError):
        kp.parse_batch_forget_in(batch[:-1])
    assert kp.parse_access_in(struct.pack("=II", os.R_OK, 0)) == os.R_OK
    assert kp.parse_interrupt_in(struct.pack("=Q", 1234)) == 1234


def test_init_in_and_out() -> None:
    init = kp.parse_init_in(kp.encode_init_in(41, 131072, (1 << 33) | kp.FUSE_ASYNC_READ))
    assert init == kp.InitIn(7, 41, 131072, (1 << 33) | kp.FUSE_ASYNC_READ)
    old = struct.pack("=IIII", 7, 31, 65536, 1)  # before 7.36: no flags2
    assert kp.parse_init_in(old) == kp.InitIn(7, 31, 65536, 1)
    out = kp.encode_init_out(minor=31, max_readahead=131072, flags=kp.FUSE_MAX_PAGES,
                             max_write=1 << 20, max_pages=256)
    fields = struct.unpack("=IIIIHHIIHHI7I", out)
    assert fields[:11] == (7, 31, 131072, kp.FUSE_MAX_PAGES, 0, 0, 1 << 20, 1, 256, 0, 0)


def test_statfs_and_notifications() -> None:
    s = StatfsReply(blocks=10, bfree=0, bavail=0, files=5, ffree=0, bsize=131072, namelen=255,
                    frsize=4096)
    assert struct.unpack("=QQQQQIIII6I", kp.encode_statfs_out(s))[:8] == (
        10, 0, 0, 5, 0, 131072, 255, 4096,
    )
    note = kp.encode_inval_entry(1, b"layer")
    length, code, unique = kp.parse_out_header(note)
    assert (length, code, unique) == (len(note), kp.NOTIFY_INVAL_ENTRY, 0)
    assert struct.unpack_from("=QII", note, 16) == (1, 5, 0) and note[32:] == b"layer\0"
    assert kp.xattr_names([b"a", b"bc"]) == b"a\0bc\0"


# -- the protocol server over a socketpair -----------------------------------------------------


class Handlers:
    """A two-entry tree: the root (1) holds file "f" (2) and symlink "l" (3)."""

    def __init__(self) -> None:
        self.files = {2: (b"f", Attributes(**{**_fields(ATTRS), "ino": 2, "size": 5}))}
        self.link = Attributes(**{**_fields(ATTRS), "ino": 3, "mode": stat.S_IFLNK | 0o777})

    def lookup(self, parent: int, name: bytes) -> Attributes:
        if parent == 1 and name == b"f":
            return self.files[2][1]
        raise FuseReplyError(errno.ENOENT)

    def getattr(self, inode: int) -> Attributes:
        if inode == 2:
            return self.files[2][1]
        raise FuseReplyError(errno.ESTALE)

    def readlink(self, inode: int) -> bytes:
        return b"target"

    def open(self, inode: int, flags: int) -> Opened:
        return Opened(fh=inode, keep_cache=True)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return b"hello"[offset : offset + size]

    def opendir(self, inode: int) -> Opened:
        return Opened(fh=inode, keep_cache=inode != 5)  # 5: a listing that changes

    def readdir(self, fh: int, offset: int, sink: DirectoryEntrySink) -> None:
        entries = [(b"f", self.files[2][1]), (b"l", self.link)]
        for position in range(offset, len(entries)):
            if not sink(entries[position][0], entries[position][1], position + 1):
                return

    def getxattr(self, inode: int, name: bytes) -> bytes:
        if name == b"user.a":
            return b"value"
        raise FuseReplyError(errno.ENODATA)

    def listxattr(self, inode: int) -> Sequence[bytes]:
        return [b"user.a"]

    def statfs(self) -> StatfsReply:
        return StatfsReply(1, 0, 0, 3, 0, 4096, 255, 4096)

    def access(self, inode: int, mask: int) -> None:
        raise RuntimeError("a handler bug")  # must become EIO, never kill the server


def _fields(a: Attributes) -> dict[str, object]:
    return {name: getattr(a, name) for name in Attributes.__slots__}


def _request(opcode: int, unique: int, nodeid: int, body: bytes = b"") -> bytes:
    return kp.encode_in_header(opcode, unique, nodeid, len(body)) + body


def _read_in(fh: int, offset: int, size: int) -> bytes:
    return struct.pack("=QQIIQII", fh, offset, size, 0, 0, 0, 0)


def _over_socketpair(main: Callable[[socket.socket, socket.socket], Awaitable[None]]) -> None:
    """Run ``main(kernel, server)`` under trio over a SOCK_SEQPACKET pair standing in for
    /dev/fuse (one datagram per request); both ends are closed afterwards."""
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        trio.run(main, kernel, server)
    finally:
        kernel.close()
        server.close()


async def _replies(
    kernel: socket.socket, count: int, seconds: float
) -> dict[int, tuple[int, bytes]]:
    """The next ``count`` replies the server wrote, {unique: (error, payload)}; each reply's
    header must state its length."""
    kernel.setblocking(False)
    replies: dict[int, tuple[int, bytes]] = {}
    with trio.fail_after(seconds):
        while len(replies) < count:
            await trio.lowlevel.wait_readable(kernel)
            data = kernel.recv(BUFFER_SIZE)
            length, error, unique = kp.parse_out_header(data)
            assert length == len(data)
            replies[unique] = (error, data[kp.OUT_HEADER_SIZE:])
    return replies


def _exchange(
    requests: list[bytes], expect: int, handlers: Handlers | None = None,
) -> dict[int, tuple[int, bytes]]:
    """Serve ``requests`` over a socketpair; returns {unique: (error, payload)} of the
    replies."""
    replies: dict[int, tuple[int, bytes]] = {}

    async def main(kernel: socket.socket, server: socket.socket) -> None:
        session = ProtocolServer(handlers or Handlers(), server.fileno(), max_tasks=4)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            for request in requests:
                await trio.to_thread.run_sync(kernel.send, request)
            replies.update(await _replies(kernel, expect, 10))
            await trio.sleep(0.1)  # nothing else must arrive (no replies to forgets)
            with pytest.raises(BlockingIOError):
                kernel.recv(BUFFER_SIZE)
            nursery.cancel_scope.cancel()

    _over_socketpair(main)
    return replies


def test_the_server_answers_each_opcode() -> None:
    getxattr = struct.pack("=II", 0, 0) + b"user.a\0"
    getxattr_small = struct.pack("=II", 2, 0) + b"user.a\0"
    getxattr_missing = struct.pack("=II", 64, 0) + b"user.b\0"
    requests = [
        _request(Opcode.LOOKUP, 2, 1, b"f\0"),
        _request(Opcode.LOOKUP, 4, 1, b"nope\0"),
        _request(Opcode.GETATTR, 6, 2, struct.pack("=IIQ", 0, 0, 0)),
        _request(Opcode.READLINK, 8, 3),
        _request(Opcode.OPEN, 10, 2, struct.pack("=II", os.O_RDONLY, 0)),
        _request(Opcode.READ, 12, 2, _read_in(2, 1, 3)),
        _request(Opcode.READDIRPLUS, 14, 1, _read_in(1, 0, 4096)),
        _request(Opcode.READDIR, 16, 1, _read_in(1, 1, 4096)),
        _request(Opcode.READDIRPLUS, 18, 1, _read_in(1, 0, 200)),  # room for one entry
        _request(Opcode.GETXATTR, 20, 2, getxattr),
        _request(Opcode.GETXATTR, 22, 2, getxattr_small),
        _request(Opcode.GETXATTR, 24, 2, getxattr_missing),
        _request(Opcode.LISTXATTR, 26, 2, struct.pack("=II", 64, 0)),
        _request(Opcode.STATFS, 28, 1),
        _request(Opcode.ACCESS, 30, 2, struct.pack("=II", os.R_OK, 0)),
        _request(Opcode.WRITE, 32, 2, b"\0" * 40),
        _request(Opcode.IOCTL, 34, 2),
        _request(Opcode.FORGET, 36, 2, struct.pack("=Q", 1)),
        _request(Opcode.BATCH_FORGET, 38, 0, struct.pack("=IIQQ", 1, 0, 2, 1)),
        _request(Opcode.INTERRUPT, 40, 0, struct.pack("=Q", 12)),
        _request(Opcode.RELEASE, 42, 2, b"\0" * 24),
        _request(Opcode.READ, 44, 2, b"short"),
        # Every flag but zero-message opendirs, so that OPENDIR is answered below.
        _request(Opcode.INIT, 46, 0,
                 kp.encode_init_in(41, 131072, 0xFFFFFFFF & ~kp.FUSE_NO_OPENDIR_SUPPORT)),
        _request(Opcode.OPENDIR, 48, 1, struct.pack("=II", 0, 0)),
        _request(Opcode.OPENDIR, 50, 5, struct.pack("=II", 0, 0)),
        _request(Opcode.FLUSH, 52, 2, b"\0" * 24),
        _request(Opcode.RELEASEDIR, 54, 1, b"\0" * 24),
    ]
    r = _exchange(requests, expect=24)
    assert r[2] == (0, kp.encode_entry_out(Handlers().files[2][1]))
    assert r[4] == (-errno.ENOENT, b"")
    assert r[6] == (0, kp.encode_attr_out(Handlers().files[2][1]))
    assert r[8] == (0, b"target")
    assert r[10] == (0, kp.encode_open_out(2, kp.FOPEN_KEEP_CACHE))
    assert r[12] == (0, b"ell")
    h = Handlers()
    assert r[14] == (0, kp.encode_direntplus(h.files[2][1], 1, b"f")
                     + kp.encode_direntplus(h.link, 2, b"l"))
    assert r[16] == (0, kp.encode_dirent(3, 2, stat.S_IFLNK, b"l"))
    assert r[18] == (0, kp.encode_direntplus(h.files[2][1], 1, b"f"))
    assert r[20] == (0, kp.encode_xattr_size(5))
    assert r[22] == (-errno.ERANGE, b"")
    assert r[24] == (-errno.ENODATA, b"")
    assert r[26] == (0, b"user.a\0")
    assert r[28] == (0, kp.encode_statfs_out(StatfsReply(1, 0, 0, 3, 0, 4096, 255, 4096)))
    assert r[30] == (-errno.EIO, b"")
    assert r[32] == (-errno.EROFS, b"")
    assert r[34] == (-errno.ENOSYS, b"")
    assert 36 not in r and 38 not in r and 40 not in r
    assert r[42] == (0, b"")
    assert r[44] == (-errno.EIO, b"")
    error, init = r[46]
    fields = struct.unpack("=IIIIHHIIHHI7I", init)
    assert error == 0 and fields[:2] == (7, 31) and fields[6] == 1 << 20 and fields[8] == 256
    assert fields[3] == (kp.FUSE_ASYNC_READ | kp.FUSE_BIG_WRITES | kp.FUSE_DO_READDIRPLUS
                         | kp.FUSE_PARALLEL_DIROPS | kp.FUSE_MAX_PAGES | kp.FUSE_CACHE_SYMLINKS
                         | kp.FUSE_AUTO_INVAL_DATA)
    # An immutable listing is cached by the kernel; one that changes is not.
    assert r[48] == (0, kp.encode_open_out(1, kp.FOPEN_CACHE_DIR | kp.FOPEN_KEEP_CACHE))
    assert r[50] == (0, kp.encode_open_out(5, 0))
    assert r[52] == (-errno.ENOSYS, b"")  # the kernel stops sending FLUSH
    assert r[54] == (0, b"")


def test_files_open_without_a_round_trip_when_init_offers_it() -> None:
    offer = kp.FUSE_ASYNC_READ | kp.FUSE_NO_OPEN_SUPPORT
    requests = [
        _request(Opcode.INIT, 2, 0, kp.encode_init_in(37, 131072, offer)),
        _request(Opcode.OPEN, 4, 2, struct.pack("=II", os.O_RDONLY, 0)),
        _request(Opcode.OPEN, 6, 2, struct.pack("=II", os.O_WRONLY, 0)),
        # Opened without an OPEN, the file's handle is 0: the node number says which file.
        _request(Opcode.READ, 8, 2, _read_in(0, 0, 5)),
    ]
    r = _exchange(requests, expect=4, handlers=ReadOnlyHandlers())
    assert r[2][0] == 0
    assert r[4] == (-errno.ENOSYS, b"")  # the kernel now opens files by itself
    assert r[6] == (-errno.EROFS, b"")  # the handler's refusals still stand
    assert r[8] == (0, b"hello")


def test_directories_open_without_a_round_trip_when_init_offers_it() -> None:
    # Linux 5.1+ (Debian 12's 6.1 too) offers FUSE_NO_OPENDIR_SUPPORT: one ENOSYS and the
    # kernel opens and releases every directory itself and caches every listing, so a warm
    # walk makes no request. The listing is then asked for with handle 0: the node says which.
    offer = kp.FUSE_ASYNC_READ | kp.FUSE_NO_OPENDIR_SUPPORT | kp.FUSE_AUTO_INVAL_DATA
    requests = [
        _request(Opcode.INIT, 2, 0, kp.encode_init_in(37, 131072, offer)),
        _request(Opcode.OPENDIR, 4, 1, struct.pack("=II", 0, 0)),
        _request(Opcode.READDIR, 6, 1, _read_in(0, 1, 4096)),
    ]
    r = _exchange(requests, expect=3)
    assert r[2][0] == 0
    assert r[4] == (-errno.ENOSYS, b"")
    assert r[6] == (0, kp.encode_dirent(3, 2, stat.S_IFLNK, b"l"))


@pytest.mark.parametrize(
    "offer", [kp.FUSE_ASYNC_READ, kp.FUSE_NO_OPENDIR_SUPPORT, None],
    ids=["old-kernel", "no-auto-inval-data", "taken-over"],
)
def test_directories_are_opened_explicitly_without_that_offer(offer: int | None) -> None:
    # Zero-message opendirs need FUSE_AUTO_INVAL_DATA too: it is what makes the kernel notice
    # that the root's cached listing changed.
    requests = [] if offer is None else [
        _request(Opcode.INIT, 2, 0, kp.encode_init_in(37, 131072, offer)),
    ]
    requests.append(_request(Opcode.OPENDIR, 4, 1, struct.pack("=II", 0, 0)))
    r = _exchange(requests, expect=len(requests))
    assert r[4] == (0, kp.encode_open_out(1, kp.FOPEN_CACHE_DIR | kp.FOPEN_KEEP_CACHE))


def test_a_directory_invalidation_covers_its_whole_cache() -> None:
    note = kp.encode_inval_inode(1)
    assert kp.parse_out_header(note) == (40, kp.NOTIFY_INVAL_INODE, 0)
    assert struct.unpack("=Qqq", note[16:]) == (1, 0, 0)  # offset 0, length 0: to the end


@pytest.mark.parametrize("taken_over", [False, True], ids=["old-kernel", "taken-over"])
def test_files_are_opened_explicitly_without_that_offer(taken_over: bool) -> None:
    # A kernel that does not offer FUSE_NO_OPEN_SUPPORT, or a connection whose INIT we never
    # saw, gets an answer to every OPEN.
    requests = [] if taken_over else [
        _request(Opcode.INIT, 2, 0, kp.encode_init_in(37, 131072, kp.FUSE_ASYNC_READ)),
    ]
    requests.append(_request(Opcode.OPEN, 4, 2, struct.pack("=II", os.O_RDONLY, 0)))
    r = _exchange(requests, expect=len(requests))
    assert r[4] == (0, kp.encode_open_out(2, kp.FOPEN_KEEP_CACHE))


class ReadOnlyHandlers(Handlers):
    def open(self, inode: int, flags: int) -> Opened:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FuseReplyError(errno.EROFS)
        return super().open(inode, flags)


def test_an_old_kernel_is_refused_at_init() -> None:
    old = struct.pack("=IIII", 7, 26, 65536, 0)
    r = _exchange([_request(Opcode.INIT, 2, 0, old)], expect=1)
    assert r[2] == (-errno.EPROTO, b"")


class StalledReads(Handlers):
    """Reads of handle 9 never finish, as on a blob that stalls."""

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        if fh == 9:
            await trio.sleep_forever()
        return await super().read(fh, offset, size)


def test_metadata_is_answered_while_every_read_slot_is_stalled() -> None:
    # Issue 15: the reader loop waited for a READ slot, so max_tasks stalled READs kept it
    # from reading anything else, lookups included.
    replies: dict[int, tuple[int, bytes]] = {}

    async def main(kernel: socket.socket, server: socket.socket) -> None:
        session = ProtocolServer(StalledReads(), server.fileno(), max_tasks=4)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            stalled = [_request(Opcode.READ, 100 + 2 * i, 9, _read_in(9, 0, 5)) for i in range(6)]
            answered = [
                _request(Opcode.LOOKUP, 2, 1, b"f\0"),
                _request(Opcode.GETATTR, 4, 2, struct.pack("=IIQ", 0, 0, 0)),
                _request(Opcode.READDIR, 6, 1, _read_in(1, 0, 4096)),
            ]
            for request in stalled + answered:
                await trio.to_thread.run_sync(kernel.send, request)
            replies.update(await _replies(kernel, len(answered), 3))
            nursery.cancel_scope.cancel()

    _over_socketpair(main)
    assert sorted(replies) == [2, 4, 6]
    assert all(error == 0 for error, _ in replies.values())


class LookupRecorder(Handlers):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def lookup(self, parent: int, name: bytes) -> Attributes:
        self.lookups += 1
        return super().lookup(parent, name)


def test_queued_requests_are_answered_without_a_yield_between_them() -> None:
    # A yield per request cost a pass of trio's scheduler (and an epoll_wait) each. Requests
    # already queued are now answered back to back, with a yield every IN_PLACE_BURST of them
    # so that the READ tasks still run, and one more once none is left.
    handlers = LookupRecorder()
    count = 3 * IN_PLACE_BURST + 2
    yields: list[int] = []  # how many lookups had been answered at each yield of the loop

    class Recording(ProtocolServer):
        async def _yield(self) -> None:
            yields.append(handlers.lookups)
            await super()._yield()

    async def main(kernel: socket.socket, server: socket.socket) -> None:
        session = Recording(handlers, server.fileno(), max_tasks=4)
        for unique in range(count):  # all queued before the server reads the first
            kernel.send(_request(Opcode.LOOKUP, 2 * unique + 2, 1, b"f\0"))
        async with trio.open_nursery() as nursery:
            await nursery.start(session.serve)
            assert len(await _replies(kernel, count, 10)) == count
            nursery.cancel_scope.cancel()

    _over_socketpair(main)
    assert handlers.lookups == count
    burst = IN_PLACE_BURST
    assert yields[:4] == [burst, 2 * burst, 3 * burst, count]
