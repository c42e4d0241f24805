"""The FUSE kernel protocol as bytes: request headers and the reply structs we send.

Layouts follow the Linux uapi header ``<linux/fuse.h>`` for protocol 7.31 and later. A kernel
that negotiated 7.31 or above expects these full modern struct sizes. Pure: no I/O, no trio,
no pyfuse3; ``fusefs.fuse.server`` drives it over a ``/dev/fuse`` fd.

The kernel and the server share a machine, so all integers are native-endian: ``=`` formats.
"""

from __future__ import annotations

import enum
import functools
import math
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

KERNEL_VERSION: Final = 7
KERNEL_MINOR_VERSION: Final = 31  # the oldest minor whose struct sizes we write

_IN_HEADER = struct.Struct("=IIQQIIIHH")  # fuse_in_header
_OUT_HEADER = struct.Struct("=IiQ")  # fuse_out_header
_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr
_ENTRY_HEAD = struct.Struct("=QQQQII")  # fuse_entry_out up to its fuse_attr
_ATTR_OUT_HEAD = struct.Struct("=QII")  # fuse_attr_out up to its fuse_attr
_OPEN_OUT = struct.Struct("=QII")  # fuse_open_out
_KSTATFS = struct.Struct("=QQQQQIIII6I")  # fuse_statfs_out (struct fuse_kstatfs)
_XATTR_OUT = struct.Struct("=II")  # fuse_getxattr_out
_GETXATTR_IN = struct.Struct("=II")  # fuse_getxattr_in
_READ_IN = struct.Struct("=QQIIQII")  # fuse_read_in
_OPEN_IN = struct.Struct("=II")  # fuse_open_in
_RELEASE_IN = struct.Struct("=QIIQ")  # fuse_release_in
_BACKING_MAP = struct.Struct("=iIQ")  # fuse_backing_map, the argument of BACKING_OPEN
_BACKING_ID = struct.Struct("=I")  # the argument of BACKING_CLOSE
_FORGET_IN = struct.Struct("=Q")  # fuse_forget_in
_BATCH_FORGET_IN = struct.Struct("=II")  # fuse_batch_forget_in
_FORGET_ONE = struct.Struct("=QQ")  # fuse_forget_one
_ACCESS_IN = struct.Struct("=II")  # fuse_access_in
_INTERRUPT_IN = struct.Struct("=Q")  # fuse_interrupt_in
_DIRENT_HEAD = struct.Struct("=QQII")  # fuse_dirent up to its name
_INIT_IN = struct.Struct("=IIIII11I")  # fuse_init_in with flags2 and unused, since 7.36
_INIT_IN_OLD = struct.Struct("=IIII")  # fuse_init_in before 7.36
_INIT_OUT = struct.Struct("=IIIIHHIIHHI7I")  # fuse_init_out
_INVAL_ENTRY = struct.Struct("=QII")  # fuse_notify_inval_entry_out
_INVAL_INODE = struct.Struct("=Qqq")  # fuse_notify_inval_inode_out
# fuse_entry_out in one struct, and followed by a dirent's head (fuse_direntplus): one pack per
# entry, as a cold readdirplus of a big directory spends most of its time encoding entries.
_ENTRY_OUT = struct.Struct(_ENTRY_HEAD.format + _ATTR.format[1:])
_DIRENTPLUS_HEAD = struct.Struct(_ENTRY_OUT.format + _DIRENT_HEAD.format[1:])
_NAME_PADDING = tuple(b"\0" * n for n in range(8))

IN_HEADER_SIZE: Final = _IN_HEADER.size
OUT_HEADER_SIZE: Final = _OUT_HEADER.size
ATTR_SIZE: Final = _ATTR.size
ENTRY_OUT_SIZE: Final = _ENTRY_HEAD.size + _ATTR.size
ATTR_OUT_SIZE: Final = _ATTR_OUT_HEAD.size + _ATTR.size
READ_IN_SIZE: Final = _READ_IN.size
STATFS_OUT_SIZE: Final = _KSTATFS.size
INIT_OUT_SIZE: Final = _INIT_OUT.size
DIRENT_HEAD_SIZE: Final = _DIRENT_HEAD.size


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_CACHE_DIR: Final = 1 << 3  # the kernel keeps the directory's listing in its page cache
# Reads (and mmap) of the file go straight to the backing file named by backing_id (7.40).
FOPEN_PASSTHROUGH: Final = 1 << 7

# fuse_init_in/out.flags
FUSE_ASYNC_READ: Final = 1 << 0
FUSE_BIG_WRITES: Final = 1 << 5
FUSE_AUTO_INVAL_DATA: Final = 1 << 12
FUSE_DO_READDIRPLUS: Final = 1 << 13
FUSE_NO_OPEN_SUPPORT: Final = 1 << 17
FUSE_PARALLEL_DIROPS: Final = 1 << 18
FUSE_MAX_PAGES: Final = 1 << 22
FUSE_CACHE_SYMLINKS: Final = 1 << 23
FUSE_NO_OPENDIR_SUPPORT: Final = 1 << 24  # offered since Linux 5.1
FUSE_INIT_EXT: Final = 1 << 30  # the flags2 words of fuse_init_in/out are meaningful
# The bits of flags2, shifted up by 32 as ``InitIn.flags`` holds them.
FUSE_PASSTHROUGH: Final = 1 << 37  # files may be opened onto a backing file (Linux 6.9)

# The kernel's FILESYSTEM_MAX_STACK_DEPTH: overlayfs refuses a layer whose filesystem already
# sits at it. A passthrough mount claims a depth at least one above its backing files'.
FILESYSTEM_MAX_STACK_DEPTH: Final = 2

# ioctls on the /dev/fuse fd (magic 229): _IOW(229, 1, struct fuse_backing_map) and
# _IOW(229, 2, uint32_t). _IOW(type, nr, size) = 1 << 30 | size << 16 | type << 8 | nr.
FUSE_DEV_IOC_BACKING_OPEN: Final = 1 << 30 | _BACKING_MAP.size << 16 | 229 << 8 | 1
FUSE_DEV_IOC_BACKING_CLOSE: Final = 1 << 30 | _BACKING_ID.size << 16 | 229 << 8 | 2

# fuse_out_header.error of a notification (unique 0)
NOTIFY_INVAL_INODE: Final = 2
NOTIFY_INVAL_ENTRY: Final = 3

# The reply error must lie in (-512, 0]: the kernel refuses anything else with EINVAL.
_MAX_ERRNO: Final = 511


class ProtocolError(ValueError):
    """A request too short for its opcode's struct: answered with EIO, never trusted."""


class InHeader(NamedTuple):
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def parse_in_header(buf: bytes | memoryview) -> InHeader:
    if len(buf) < IN_HEADER_SIZE:
        raise ProtocolError(f"request of {len(buf)} bytes is shorter than fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = _IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ProtocolError(f"fuse_in_header.len {length} but {len(buf)} bytes were read")
    return InHeader(length, opcode, unique, nodeid, uid, gid, pid)


def encode_in_header(
    opcode: int, unique: int, nodeid: int, body_len: int, *, uid: int = 0, gid: int = 0,
    pid: int = 0,
) -> bytes:
    """What the kernel writes; tests and fakes use it."""
    return _IN_HEADER.pack(IN_HEADER_SIZE + body_len, opcode, unique, nodeid, uid, gid, pid, 0, 0)


# -- replies -------------------------------------------------------------------------------


def reply(unique: int, *payload: bytes) -> bytes:
    """A successful reply: fuse_out_header then the payload pieces (one write)."""
    size = OUT_HEADER_SIZE + sum(len(p) for p in payload)
    return b"".join((_OUT_HEADER.pack(size, 0, unique), *payload))


def reply_header(unique: int, payload_size: int) -> bytes:
    """The fuse_out_header of a successful reply whose payload is written after it in the
    same ``writev``: a READ's data is not copied once more to be joined to its header."""
    return _OUT_HEADER.pack(OUT_HEADER_SIZE + payload_size, 0, unique)


def error_reply(unique: int, errno_value: int) -> bytes:
    if not 0 < errno_value <= _MAX_ERRNO:
        raise ValueError(f"errno {errno_value} cannot be sent to the kernel")
    return _OUT_HEADER.pack(OUT_HEADER_SIZE, -errno_value, unique)


def parse_out_header(buf: bytes) -> tuple[int, int, int]:
    """The length, error and unique of a reply, for tests."""
    length, error, unique = _OUT_HEADER.unpack_from(buf)
    return length, error, unique


@functools.lru_cache(maxsize=16)  # a handful of distinct timeouts, asked for each entry
def split_timeout(seconds: float) -> tuple[int, int]:
    """(seconds, nanoseconds) of a cache timeout, as libfuse converts it (negative: 0)."""
    if not seconds > 0 or math.isnan(seconds):
        return 0, 0
    if seconds >= 1 << 64:  # "forever" (also infinity): the largest value the field holds
        return (1 << 64) - 1, 0
    whole = int(seconds)
    return whole, min(int((seconds - whole) * 1e9), 999_999_999)


# Not frozen: one is built per lookup and per directory entry, and a frozen dataclass takes
# about four times as long to build.
@dataclass(slots=True)
class Attributes:
    """One entry's attributes and cache timeouts, the fields of pyfuse3's EntryAttributes."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


def _split_ns(ns: int) -> tuple[int, int]:
    seconds, nsec = divmod(ns, 1_000_000_000)
    return seconds & ((1 << 64) - 1), nsec  # pre-1970 times wrap like the C cast does


def encode_attr(a: Attributes) -> bytes:
    """struct fuse_attr, with the device number in the kernel's new_encode_dev form as libfuse."""
    return _ATTR.pack(*_attr_fields(a))


def _attr_fields(a: Attributes) -> tuple[int, ...]:
    atime, atimensec = _split_ns(a.atime_ns)
    if a.mtime_ns == a.atime_ns == a.ctime_ns:  # what layers report: one time for all three
        mtime, mtimensec = ctime, ctimensec = atime, atimensec
    else:
        mtime, mtimensec = _split_ns(a.mtime_ns)
        ctime, ctimensec = _split_ns(a.ctime_ns)
    return (
        a.ino, a.size, a.blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
        a.mode, a.nlink, a.uid, a.gid, _encode_dev(a.rdev), a.blksize, 0,
    )


def _entry_fields(a: Attributes) -> tuple[int, ...]:
    entry_sec, entry_nsec = split_timeout(a.entry_timeout)
    attr_sec, attr_nsec = split_timeout(a.attr_timeout)
    return (a.ino, a.generation, entry_sec, attr_sec, entry_nsec, attr_nsec, *_attr_fields(a))


def _encode_dev(rdev: int) -> int:
    """glibc's dev_t truncated to 32 bits, as libfuse copies it into fuse_attr.rdev."""
    return rdev & 0xFFFFFFFF


def encode_entry_out(a: Attributes) -> bytes:
    return _ENTRY_OUT.pack(*_entry_fields(a))


def encode_attr_out(a: Attributes) -> bytes:
    attr_sec, attr_nsec = split_timeout(a.attr_timeout)
    return _ATTR_OUT_HEAD.pack(attr_sec, attr_nsec, 0) + encode_attr(a)


def encode_open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    """fuse_open_out; ``backing_id`` only counts with FOPEN_PASSTHROUGH."""
    return _OPEN_OUT.pack(fh, open_flags, backing_id)


def encode_backing_map(fd: int) -> bytes:
    """The argument of FUSE_DEV_IOC_BACKING_OPEN: the fd of the file to register."""
    return _BACKING_MAP.pack(fd, 0, 0)


def encode_backing_id(backing_id: int) -> bytes:
    """The argument of FUSE_DEV_IOC_BACKING_CLOSE."""
    return _BACKING_ID.pack(backing_id)


@dataclass(frozen=True, slots=True)
class StatfsReply:
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


def encode_statfs_out(s: StatfsReply) -> bytes:
    return _KSTATFS.pack(
        s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize, 0,
        0, 0, 0, 0, 0, 0,
    )


def encode_xattr_size(size: int) -> bytes:
    """fuse_getxattr_out: the answer to a size probe, a request of size 0."""
    return _XATTR_OUT.pack(size, 0)


def dirent_type(mode: int) -> int:
    """d_type of a mode, such as DT_REG = 8 or DT_DIR = 4: the file type bits shifted down."""
    return stat.S_IFMT(mode) >> 12


def _align8(n: int) -> int:
    return (n + 7) & ~7


def dirent_size(name: bytes) -> int:
    return _align8(DIRENT_HEAD_SIZE + len(name))


def direntplus_size(name: bytes) -> int:
    return ENTRY_OUT_SIZE + dirent_size(name)


def encode_dirent(ino: int, next_offset: int, mode: int, name: bytes) -> bytes:
    """struct fuse_dirent padded to 8 bytes (FUSE_DIRENT_ALIGN)."""
    raw = _DIRENT_HEAD.pack(ino, next_offset, len(name), dirent_type(mode)) + name
    return raw + b"\0" * (_align8(len(raw)) - len(raw))


def encode_direntplus(a: Attributes, next_offset: int, name: bytes) -> bytes:
    """struct fuse_direntplus: the entry, on which the kernel takes a lookup reference, then
    the dirent."""
    head = _DIRENTPLUS_HEAD.pack(
        *_entry_fields(a), a.ino, next_offset, len(name), dirent_type(a.mode)
    )
    return b"".join((head, name, _NAME_PADDING[-len(name) & 7]))


def encode_inval_entry(parent: int, name: bytes) -> bytes:
    """A FUSE_NOTIFY_INVAL_ENTRY notification, header included. Its unique is 0 and its error
    field holds the notification code."""
    body = _INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
    return _OUT_HEADER.pack(OUT_HEADER_SIZE + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def encode_inval_inode(inode: int) -> bytes:
    """A FUSE_NOTIFY_INVAL_INODE notification for all of ``inode``: its attributes and its
    page cache, which for a directory is its cached listing (offset 0, length 0: to the end)."""
    body = _INVAL_INODE.pack(inode, 0, 0)
    return _OUT_HEADER.pack(OUT_HEADER_SIZE + len(body), NOTIFY_INVAL_INODE, 0) + body


# -- request bodies --------------------------------------------------------------------------


def _need(body: bytes | memoryview, size: int, what: str) -> None:
    if len(body) < size:
        raise ProtocolError(f"{what}: {len(body)} bytes, need {size}")


def parse_name(body: bytes | memoryview) -> bytes:
    """A NUL-terminated name (LOOKUP)."""
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("name without a terminating NUL")
    return raw[:end]


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int
    flags: int


def parse_read_in(body: bytes | memoryview) -> ReadIn:
    """fuse_read_in, as READ, READDIR and READDIRPLUS send it."""
    _need(body, READ_IN_SIZE, "fuse_read_in")
    fh, offset, size, _read_flags, _lock_owner, flags, _pad = _READ_IN.unpack_from(body)
    return ReadIn(fh, offset, size, flags)


def parse_open_in(body: bytes | memoryview) -> int:
    """fuse_open_in.flags (OPEN, OPENDIR)."""
    _need(body, _OPEN_IN.size, "fuse_open_in")
    flags, _open_flags = _OPEN_IN.unpack_from(body)
    return int(flags)


def parse_release_in(body: bytes | memoryview) -> int:
    """fuse_release_in.fh: the handle the OPEN reply gave the file."""
    _need(body, _RELEASE_IN.size, "fuse_release_in")
    fh, _flags, _release_flags, _lock_owner = _RELEASE_IN.unpack_from(body)
    return int(fh)


def parse_getxattr_in(body: bytes | memoryview) -> tuple[int, bytes]:
    """(size, name) of GETXATTR; LISTXATTR carries the same struct without a name."""
    _need(body, _GETXATTR_IN.size, "fuse_getxattr_in")
    size, _pad = _GETXATTR_IN.unpack_from(body)
    name = parse_name(body[_GETXATTR_IN.size :]) if len(body) > _GETXATTR_IN.size else b""
    return int(size), name


def parse_access_in(body: bytes | memoryview) -> int:
    _need(body, _ACCESS_IN.size, "fuse_access_in")
    mask, _pad = _ACCESS_IN.unpack_from(body)
    return int(mask)


def parse_forget_in(body: bytes | memoryview) -> int:
    _need(body, _FORGET_IN.size, "fuse_forget_in")
    (nlookup,) = _FORGET_IN.unpack_from(body)
    return int(nlookup)


def parse_batch_forget_in(body: bytes | memoryview) -> list[tuple[int, int]]:
    """(nodeid, nlookup) pairs of a BATCH_FORGET."""
    _need(body, _BATCH_FORGET_IN.size, "fuse_batch_forget_in")
    count, _dummy = _BATCH_FORGET_IN.unpack_from(body)
    _need(body, _BATCH_FORGET_IN.size + count * _FORGET_ONE.size, "fuse_forget_one list")
    return [
        _FORGET_ONE.unpack_from(body, _BATCH_FORGET_IN.size + i * _FORGET_ONE.size)
        for i in range(count)
    ]


def parse_interrupt_in(body: bytes | memoryview) -> int:
    _need(body, _INTERRUPT_IN.size, "fuse_interrupt_in")
    (unique,) = _INTERRUPT_IN.unpack_from(body)
    return int(unique)


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32


def parse_init_in(body: bytes | memoryview) -> InitIn:
    _need(body, _INIT_IN_OLD.size, "fuse_init_in")
    major, minor, max_readahead, flags = _INIT_IN_OLD.unpack_from(body)
    if len(body) >= _INIT_IN.size:
        flags |= _INIT_IN.unpack_from(body)[4] << 32
    return InitIn(major, minor, max_readahead, flags)


def encode_init_out(
    *, minor: int, max_readahead: int, flags: int, max_write: int, max_pages: int,
    time_gran: int = 1, max_stack_depth: int = 0,
) -> bytes:
    """fuse_init_out. ``flags`` above bit 31 go to flags2, which the kernel reads only with
    FUSE_INIT_EXT in ``flags``; ``max_stack_depth`` (7.40) only counts with FUSE_PASSTHROUGH."""
    return _INIT_OUT.pack(
        KERNEL_VERSION, minor, max_readahead, flags & 0xFFFFFFFF, 0, 0, max_write, time_gran,
        max_pages, 0, flags >> 32, max_stack_depth, 0, 0, 0, 0, 0, 0,
    )


def encode_init_in(minor: int, max_readahead: int, flags: int) -> bytes:
    """What the kernel sends in INIT (for tests)."""
    return _INIT_IN.pack(
        KERNEL_VERSION, minor, max_readahead, flags & 0xFFFFFFFF, flags >> 32, *([0] * 11)
    )


def xattr_names(names: Sequence[bytes]) -> bytes:
    """LISTXATTR's payload: every name NUL-terminated."""
    return b"".join(name + b"\0" for name in names)
