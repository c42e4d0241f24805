"""A FUSE server that speaks the kernel protocol itself, for a connection someone else opened.

libfuse (and so pyfuse3) can only serve a connection it initialised: until it has seen
FUSE_INIT it answers every request with EIO, and the kernel sends INIT once per connection. A
restarted daemon that adopts the ``/dev/fuse`` fd of its predecessor (kept alive by
``snapshotter.fuse_keeper``) therefore reads and answers requests here, on trio, with the same
request handlers behind a small adapter (``fusefs.session``; this module never imports pyfuse3).
If an INIT does arrive (a fresh mount, as the tests make), it is answered too.

One reader loop; every READ runs in its own task, at most ``max_tasks`` at a time (what
pyfuse3's ``main(max_tasks=64)`` allows); metadata requests, answered from memory, are answered
in the loop. Each reply is one ``write``. FORGET and
BATCH_FORGET get no reply (inodes are arithmetic: nothing to forget), INTERRUPT neither (the
interrupted request is simply answered when done, which the protocol allows).

Requests the dead process had read but not answered are answered with EINTR before anything
else (``_answer_lost``), so their callers do not wait forever.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

import trio

from fusefs import kernel_protocol as kp
from fusefs.kernel_protocol import Attributes, Opcode, StatfsReply

log = logging.getLogger(__name__)

MAX_WRITE: Final = 1 << 20  # what we offer in INIT; libfuse 3.14 negotiated the same
MAX_PAGES: Final = MAX_WRITE // 4096
# The kernel refuses a read shorter than max_write + the WRITE headers (even on a read-only
# mount); the connection we adopt was negotiated by libfuse with max_write = 1 MiB.
BUFFER_SIZE: Final = MAX_WRITE + 4096
DEFAULT_MAX_TASKS: Final = 64
# How far below the first request we read to look for requests our predecessor read but never
# answered (the kernel numbers requests in steps of 2; it never has more than a few hundred
# requests waiting, so 32768 candidates is plenty, and costs about 0.1 s once).
LOST_REQUEST_WINDOW: Final = 1 << 16
# What a lost request is answered with: the syscall it belongs to fails with EINTR, which
# robust programs retry (Python and Go do by themselves); a lost readahead is simply re-read.
LOST_REQUEST_ERRNO: Final = errno.EINTR
_INIT_FLAGS: Final = (
    kp.FUSE_ASYNC_READ | kp.FUSE_BIG_WRITES | kp.FUSE_DO_READDIRPLUS | kp.FUSE_PARALLEL_DIROPS
    | kp.FUSE_MAX_PAGES
)

# Operations that would change something: the mount is read-only (pyfuse3 answers EROFS too).
_WRITES: Final = frozenset({
    Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR,
    Opcode.RENAME, Opcode.RENAME2, Opcode.LINK, Opcode.WRITE, Opcode.CREATE, Opcode.SETXATTR,
    Opcode.REMOVEXATTR, Opcode.FALLOCATE, Opcode.TMPFILE, Opcode.COPY_FILE_RANGE,
})
_NO_REPLY: Final = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})
_OPCODE: Final = struct.Struct("=I")  # fuse_in_header.opcode, at offset 4


class ReplyError(Exception):
    """Raised by a handler: the request is answered with ``errno``."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(errno_value)
        self.errno = errno_value


class RequestHandlers(Protocol):
    """What the server calls; errors are ``ReplyError``. ``fusefs.session`` adapts
    ``LazyOperations`` (pyfuse3 types) to this.

    Only ``read`` may wait (for a fetch): it runs in a task of its own. Every other handler
    answers from memory and runs in the reader loop itself, which reads nothing meanwhile."""

    async def lookup(self, parent: int, name: bytes) -> Attributes: ...

    async def getattr(self, inode: int) -> Attributes: ...

    async def readlink(self, inode: int) -> bytes: ...

    async def open(self, inode: int, flags: int) -> tuple[int, int]:
        """(file handle, FOPEN_* flags)."""
        ...

    async def read(self, fh: int, offset: int, size: int) -> bytes: ...

    async def opendir(self, inode: int) -> int: ...

    def directory_entries(self, fh: int, offset: int) -> Iterator[tuple[bytes, Attributes, int]]:
        """(name, attributes, offset of the next entry) from ``offset`` on."""
        ...

    async def getxattr(self, inode: int, name: bytes) -> bytes: ...

    async def listxattr(self, inode: int) -> Sequence[bytes]: ...

    async def statfs(self) -> StatfsReply: ...

    async def access(self, inode: int, mask: int) -> None: ...


class ResumedSession:
    """Serves ``fd`` (an open ``/dev/fuse`` connection) until the filesystem is unmounted."""

    def __init__(
        self, handlers: RequestHandlers, fd: int, *, max_tasks: int = DEFAULT_MAX_TASKS,
        answer_lost: bool = False,
    ) -> None:
        """``answer_lost``: the connection was served by a process that died; release the
        requests it had read and not answered (see ``_answer_lost``)."""
        self._handlers = handlers
        self._fd = fd
        self._answer_lost_pending = answer_lost
        self.lost_answered = 0
        self._slots = trio.Semaphore(max_tasks)
        self._nursery: trio.Nursery | None = None
        self.requests = 0

    @property
    def fd(self) -> int:
        return self._fd

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and answer requests; returns once the kernel ends the connection (ENODEV)."""
        os.set_blocking(self._fd, False)
        buffer = bytearray(BUFFER_SIZE)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    request = await self._read(buffer)
                    if request is None:
                        break
                    if self._answer_lost_pending:
                        self._answer_lost_pending = False
                        self._answer_lost(request)
                    await self._slots.acquire()  # also the loop's checkpoint
                    if _opcode(request) == Opcode.READ:
                        nursery.start_soon(self._answer, request)
                    else:
                        # Metadata answers come from memory: answered in place, a task each
                        # would double the cost of a round trip.
                        await self._answer(request)
            finally:
                self._nursery = None
                # The connection is gone: answers still being computed have nowhere to go.
                nursery.cancel_scope.cancel()

    async def _read(self, buffer: bytearray) -> bytes | None:
        """The next request, or None once the filesystem is unmounted."""
        while True:
            try:
                n = os.readv(self._fd, [buffer])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if exc.errno == errno.ENODEV:  # unmounted / connection aborted
                    return None
                raise
            self.requests += 1
            return bytes(memoryview(buffer)[:n])  # one copy of the request, not two

    async def _answer(self, request: bytes) -> None:
        try:
            try:
                header = kp.parse_in_header(request)
            except kp.ProtocolError as exc:
                log.error("fuse request unreadable error=%s", exc)
                return
            body = memoryview(request)[kp.IN_HEADER_SIZE :]
            if header.opcode in _NO_REPLY:
                return
            try:
                out = await self._dispatch(header, body)
            except ReplyError as exc:
                out = kp.error_reply(header.unique, exc.errno)
            except kp.ProtocolError as exc:
                log.error("fuse request malformed opcode=%d error=%s", header.opcode, exc)
                out = kp.error_reply(header.unique, errno.EIO)
            except Exception as exc:  # the error boundary: never lose the server to a handler
                log.error("fuse request failed opcode=%d nodeid=%d error=%r",
                          header.opcode, header.nodeid, exc)
                out = kp.error_reply(header.unique, errno.EIO)
            self._write(out)
        finally:
            self._slots.release()

    def _answer_lost(self, first: bytes) -> None:
        """Answer the requests a dead predecessor had read but not answered.

        Their callers would otherwise wait until killed. The kernel keeps such a request on the
        connection's processing list, which a reply matches by its unique number; we do not know
        those numbers, but they lie just below that of the first request we read (requests are
        numbered as they are queued, and read in queue order). So every number of the window
        below it gets an error reply: the kernel refuses (ENOENT) each one that is not waiting,
        and nothing else of ours is in flight yet. Runs once, before anything is dispatched.
        """
        try:
            header = kp.parse_in_header(first)
        except kp.ProtocolError:
            return
        top = header.unique & ~1  # an INTERRUPT carries its request's number with bit 0 set
        handled = None if header.opcode in _NO_REPLY else header.unique
        for unique in range(top, max(top - LOST_REQUEST_WINDOW, 0), -2):
            if unique == handled:
                continue
            try:
                os.write(self._fd, kp.error_reply(unique, LOST_REQUEST_ERRNO))
            except OSError:
                continue
            self.lost_answered += 1
        if self.lost_answered:
            log.warning("fuse requests of the previous process answered count=%d errno=%s",
                        self.lost_answered, errno.errorcode[LOST_REQUEST_ERRNO])

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except OSError as exc:
            # ENOENT: the request is no longer waited for (interrupted, its process killed);
            # ENODEV: the connection ended. Neither is ours to fix.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("fuse reply not written error=%r", exc)

    async def _dispatch(self, h: kp.InHeader, body: memoryview) -> bytes:
        handlers = self._handlers
        unique = h.unique
        match h.opcode:
            case Opcode.LOOKUP:
                attrs = await handlers.lookup(h.nodeid, kp.parse_name(body))
                return kp.reply(unique, kp.encode_entry_out(attrs))
            case Opcode.GETATTR:
                return kp.reply(unique, kp.encode_attr_out(await handlers.getattr(h.nodeid)))
            case Opcode.READLINK:
                return kp.reply(unique, await handlers.readlink(h.nodeid))
            case Opcode.OPEN:
                fh, flags = await handlers.open(h.nodeid, kp.parse_open_in(body))
                return kp.reply(unique, kp.encode_open_out(fh, flags))
            case Opcode.READ:
                read = kp.parse_read_in(body)
                return kp.reply(unique, await handlers.read(read.fh, read.offset, read.size))
            case Opcode.OPENDIR:
                kp.parse_open_in(body)
                fh = await handlers.opendir(h.nodeid)
                return kp.reply(unique, kp.encode_open_out(fh, 0))
            case Opcode.READDIR | Opcode.READDIRPLUS:
                read = kp.parse_read_in(body)
                listing = self._listing(read, plus=h.opcode == Opcode.READDIRPLUS)
                return kp.reply(unique, listing)
            case Opcode.GETXATTR:
                size, name = kp.parse_getxattr_in(body)
                return kp.reply(unique, _sized(await handlers.getxattr(h.nodeid, name), size))
            case Opcode.LISTXATTR:
                size, _ = kp.parse_getxattr_in(body)
                names = kp.xattr_names(await handlers.listxattr(h.nodeid))
                return kp.reply(unique, _sized(names, size))
            case Opcode.STATFS:
                return kp.reply(unique, kp.encode_statfs_out(await handlers.statfs()))
            case Opcode.ACCESS:
                await handlers.access(h.nodeid, kp.parse_access_in(body))
                return kp.reply(unique)
            case Opcode.RELEASE | Opcode.RELEASEDIR | Opcode.FLUSH | Opcode.DESTROY:
                return kp.reply(unique)  # handles are inode numbers: nothing to free
            case Opcode.INIT:
                return kp.reply(unique, _init_reply(kp.parse_init_in(body)))
            case opcode if opcode in _WRITES:
                raise ReplyError(errno.EROFS)
            case _:
                raise ReplyError(errno.ENOSYS)

    def _listing(self, read: kp.ReadIn, *, plus: bool) -> bytes:
        pieces: list[bytes] = []
        used = 0
        for name, attrs, next_offset in self._handlers.directory_entries(read.fh, read.offset):
            if plus:
                piece = kp.encode_direntplus(attrs, next_offset, name)
            else:
                piece = kp.encode_dirent(attrs.ino, next_offset, attrs.mode, name)
            if used + len(piece) > read.size:
                break
            pieces.append(piece)
            used += len(piece)
        return b"".join(pieces)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Tell the kernel that ``name`` left ``parent``. The write runs on a worker thread:
        the kernel may wait for a lookup in ``parent`` that this very server has to answer."""
        nursery = self._nursery
        if nursery is None:
            return
        notification = kp.encode_inval_entry(parent, name)
        nursery.start_soon(trio.to_thread.run_sync, self._write_notification, notification)

    def _write_notification(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except OSError as exc:  # only a cache hint: the lookup fails with ENOENT anyway
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("entry invalidation failed error=%r", exc)


def _opcode(request: bytes) -> int:
    return _OPCODE.unpack_from(request, 4)[0] if len(request) >= 8 else 0


def _sized(value: bytes, size: int) -> bytes:
    """GETXATTR/LISTXATTR: size 0 asks for the length; a short buffer is ERANGE."""
    if size == 0:
        return kp.encode_xattr_size(len(value))
    if len(value) > size:
        raise ReplyError(errno.ERANGE)
    return value


def _init_reply(init: kp.InitIn) -> bytes:
    if init.major != kp.KERNEL_VERSION or init.minor < kp.KERNEL_MINOR_VERSION:
        # The struct sizes we write need 7.31 or later; an older kernel is refused.
        raise ReplyError(errno.EPROTO)
    log.info("fuse init major=%d minor=%d", init.major, init.minor)
    return kp.encode_init_out(
        minor=kp.KERNEL_MINOR_VERSION,
        max_readahead=init.max_readahead,
        flags=init.flags & _INIT_FLAGS,
        max_write=MAX_WRITE,
        max_pages=MAX_PAGES,
    )
