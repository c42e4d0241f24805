"""A FUSE server that speaks the kernel protocol itself, on trio.

libfuse, and so pyfuse3, can only serve a connection it initialised: until it has seen
FUSE_INIT it answers every request with EIO, and the kernel sends INIT once per connection. A
restarted daemon that adopts the ``/dev/fuse`` fd of its predecessor, kept alive by
``snapshotter.daemon.keeper``, therefore reads and answers requests here. As root it also
serves fresh mounts from INIT on, because it can ask the kernel for what pyfuse3 cannot:
cached directory listings and files and directories opened without a round trip, or, when
asked and the kernel offers it, FUSE passthrough (``fusefs.fuse.passthrough``). It calls
``fusefs.handlers`` directly and never imports pyfuse3.

One reader loop. Only read may wait: each READ runs in its own task, at most ``max_tasks`` of
them computing at a time. A READ past that waits in its task, never in the loop: stalled reads
must not keep the loop from reading a lookup. The handlers of every other request are plain
functions that answer from memory, called in the loop itself, back to back while requests are
queued (see ``_read`` for when the loop yields); a lookup of a layer whose index is still being
built (``handlers.LayerPending``) is answered later, from its own task. Each reply is one
``write`` (a READ's a ``writev`` of its header and data).
FORGET and BATCH_FORGET get no reply because inodes are arithmetic. INTERRUPT gets none either:
the interrupted request is answered when done, which the protocol allows.

Requests the dead process had read but not answered are answered with EINTR before anything
else (``_answer_lost``), so their callers do not wait forever.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Awaitable, Sequence
from typing import Final, Protocol

import trio

from fusefs.fuse import abi as kp
from fusefs.fuse.abi import Attributes, Opcode, StatfsReply
from fusefs.fuse.passthrough import MAX_STACK_DEPTH, Passthrough
from fusefs.handlers import (
    WRITE_OPERATIONS,
    DirectoryEntrySink,
    FuseReplyError,
    LayerPending,
    Opened,
)

log = logging.getLogger(__name__)

MAX_WRITE: Final = 1 << 20  # what we offer in INIT; libfuse 3.14 negotiated the same
MAX_PAGES: Final = MAX_WRITE // 4096
# The kernel refuses a read shorter than max_write + the WRITE headers, even on a read-only
# mount. The connection we adopt was negotiated by libfuse with max_write = 1 MiB.
BUFFER_SIZE: Final = MAX_WRITE + 4096
DEFAULT_MAX_TASKS: Final = 64
# How many requests the reader loop answers in place before it lets other tasks run even
# though the next request is already waiting. Once none is, waiting for one yields anyway.
# A yield per request cost a pass of trio's scheduler and an epoll_wait each.
IN_PLACE_BURST: Final = 16
# How far below the first request we read to look for requests our predecessor read but never
# answered. The kernel numbers requests in steps of 2 and never has more than a few hundred
# waiting, so 32768 candidates are plenty; they cost about 0.1 s, once.
LOST_REQUEST_WINDOW: Final = 1 << 16
# What a lost request is answered with: its syscall fails with EINTR, which robust programs
# retry, as Python and Go do by themselves. A lost readahead is simply read again.
LOST_REQUEST_ERRNO: Final = errno.EINTR
# What we take of the kernel's INIT offer. FUSE_CACHE_SYMLINKS keeps readlink answers in the
# page cache; the tree never changes, so nothing ever invalidates them.
# FUSE_AUTO_INVAL_DATA makes the kernel check a directory's mtime, asking for it if its
# attributes expired, before it lists the directory from its cache; that is how the changing
# listing of the mount root is noticed (``invalidate_listing``). libfuse asks for it too. Its
# other effect, a file's pages dropped when its mtime or size changes, never happens here.
_INIT_FLAGS: Final = (
    kp.FUSE_ASYNC_READ | kp.FUSE_BIG_WRITES | kp.FUSE_DO_READDIRPLUS | kp.FUSE_PARALLEL_DIROPS
    | kp.FUSE_MAX_PAGES | kp.FUSE_CACHE_SYMLINKS | kp.FUSE_AUTO_INVAL_DATA
)

# The read-only rule of ``fusefs.handlers``, as opcodes.
_WRITES: Final = frozenset(Opcode[name.upper()] for name in WRITE_OPERATIONS)
_NO_REPLY: Final = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})
_OPCODE: Final = struct.Struct("=I")  # fuse_in_header.opcode, at offset 4


class RequestHandlers(Protocol):
    """What the server calls, ``fusefs.handlers.LazyHandlers`` in production. Errors are
    ``FuseReplyError``. Only ``read`` may wait; the others are answered in the reader loop."""

    def lookup(self, parent_inode: int, name: bytes) -> Attributes: ...

    def getattr(self, inode: int) -> Attributes: ...

    def readlink(self, inode: int) -> bytes: ...

    def open(self, inode: int, flags: int) -> Opened: ...

    def read(self, fh: int, offset: int, size: int) -> Awaitable[bytes]: ...

    def opendir(self, inode: int) -> Opened: ...

    def readdir(self, fh: int, start_id: int, sink: DirectoryEntrySink) -> None: ...

    def getxattr(self, inode: int, name: bytes) -> bytes: ...

    def listxattr(self, inode: int) -> Sequence[bytes]: ...

    def statfs(self) -> StatfsReply: ...

    def access(self, inode: int, mask: int) -> None: ...


class ProtocolServer:
    """Serves ``fd``, an open ``/dev/fuse`` connection, until the filesystem is unmounted."""

    def __init__(
        self, handlers: RequestHandlers, fd: int, *, max_tasks: int = DEFAULT_MAX_TASKS,
        answer_lost: bool = False, passthrough: Passthrough | None = None,
        passthrough_negotiated: bool = False,
    ) -> None:
        """``answer_lost``: the connection was served by a process that died; release the
        requests it had read and not answered (see ``_answer_lost``). ``passthrough``: take FUSE
        passthrough if the kernel offers it at INIT (``fusefs.fuse.passthrough``), or, with
        ``passthrough_negotiated``, a connection taken over whose INIT took it already."""
        self._handlers = handlers
        self._fd = fd
        self._answer_lost_pending = answer_lost
        self.lost_answered = 0
        self._slots = trio.Semaphore(max_tasks)
        self._unyielded = 0  # requests answered in place since the loop last let others run
        self._nursery: trio.Nursery | None = None
        self.requests = 0
        # Whether the kernel said in INIT that it opens files, or directories, without asking
        # us. Unknown on a connection taken over (we never see its INIT): then every OPEN and
        # OPENDIR is answered.
        self.zero_message_open = False
        self.zero_message_opendir = False
        self._passthrough_wanted = passthrough
        # Set at INIT when the kernel accepted passthrough; then every OPEN is answered.
        self.passthrough: Passthrough | None = passthrough if passthrough_negotiated else None

    @property
    def fd(self) -> int:
        return self._fd

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and answer requests; returns once the kernel ends the connection (ENODEV)."""
        os.set_blocking(self._fd, False)
        buffer = bytearray(BUFFER_SIZE)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._passthrough_wanted is not None:
                self._passthrough_wanted.start(nursery)
            task_status.started()
            try:
                while True:
                    request = await self._read(buffer)
                    if request is None:
                        break
                    if self._answer_lost_pending:
                        self._answer_lost_pending = False
                        self._answer_lost(request)
                    if _opcode(request) == Opcode.READ:
                        nursery.start_soon(self._answer_read, request)
                    else:
                        # Answered in place from memory: a task each would double the cost
                        # of a round trip.
                        self._answer_now(request)
                        self._unyielded += 1
                        if self._unyielded >= IN_PLACE_BURST:
                            await self._yield()  # let the READ tasks run
            finally:
                self._nursery = None
                if self._passthrough_wanted is not None:
                    self._passthrough_wanted.start(None)
                # The connection is gone: answers still being computed have nowhere to go.
                nursery.cancel_scope.cancel()

    async def _yield(self) -> None:
        self._unyielded = 0
        await trio.lowlevel.checkpoint()

    async def _read(self, buffer: bytearray) -> bytes | None:
        """The next request, or None once the filesystem is unmounted.

        Requests already queued are read without a yield (up to ``IN_PLACE_BURST`` of them).
        When none is, one pass of trio's scheduler comes first: it runs the READ tasks, and a
        caller that makes one request after another, as a walk does, has usually queued its
        next by then, which is cheaper than sleeping in epoll and being woken. Only then does
        the loop wait for the fd."""
        yielded = False
        while True:
            try:
                n = os.readv(self._fd, [buffer])
            except BlockingIOError:
                if not yielded:
                    yielded = True
                    await self._yield()
                    continue
                self._unyielded = 0
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

    def _answer_now(self, request: bytes) -> None:
        parsed = _parse(request)
        if parsed is None:
            return
        header, body = parsed
        try:
            out = self._dispatch(header, body)
        except LayerPending as pending:
            # A lookup of a layer whose index is being built: it waits in a task of its own,
            # and the loop goes on reading other requests.
            assert self._nursery is not None
            self._nursery.start_soon(self._answer_when_ready, request, pending.ready)
            return
        except Exception as exc:
            out = _error_reply(header, exc)
        self._write(out)

    async def _answer_when_ready(self, request: bytes, ready: trio.Event) -> None:
        await ready.wait()
        self._answer_now(request)

    async def _answer_read(self, request: bytes) -> None:
        # A READ waiting for a slot costs a task and its request's bytes. Each slot is held at
        # most the read deadline, which the handlers keep.
        async with self._slots:
            parsed = _parse(request)
            if parsed is None:
                return
            header, body = parsed
            try:
                read = kp.parse_read_in(body)
                # The node, not read.fh: a file opened without an OPEN has handle 0. Handles
                # are node numbers anyway.
                data = await self._handlers.read(header.nodeid, read.offset, read.size)
            except Exception as exc:
                self._write(_error_reply(header, exc))
                return
            self._write(kp.reply_header(header.unique, len(data)), data)

    def _answer_lost(self, first: bytes) -> None:
        """Answer the requests a dead predecessor had read but not answered.

        Their callers would otherwise wait until killed. The kernel keeps such a request on the
        connection's processing list, which a reply matches by its unique number; we do not know
        those numbers, but they lie just below that of the first request we read: requests are
        numbered as they are queued, and read in queue order. So every number of the window
        below it gets an error reply. The kernel refuses with ENOENT each one that is not waiting,
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
                        self.lost_answered, errno.errorcode[LOST_REQUEST_ERRNO],
                        extra={"event": "fuse_lost_requests_answered"})

    def _write(self, *pieces: bytes) -> None:
        """One reply, in one write (the kernel takes a reply from a single write call)."""
        try:
            os.writev(self._fd, pieces)
        except OSError as exc:
            # ENOENT: the request is no longer waited for, because it was interrupted or its
            # process killed. ENODEV: the connection ended. Neither is ours to fix.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("fuse reply not written error=%r", exc)

    def _dispatch(self, h: kp.InHeader, body: memoryview) -> bytes:
        """The reply to any request but READ."""
        handlers = self._handlers
        unique = h.unique
        match h.opcode:
            case Opcode.LOOKUP:
                attrs = handlers.lookup(h.nodeid, kp.parse_name(body))
                return kp.reply(unique, kp.encode_entry_out(attrs))
            case Opcode.GETATTR:
                return kp.reply(unique, kp.encode_attr_out(handlers.getattr(h.nodeid)))
            case Opcode.READLINK:
                return kp.reply(unique, handlers.readlink(h.nodeid))
            case Opcode.OPEN:
                opened = handlers.open(h.nodeid, kp.parse_open_in(body))
                if self.passthrough is not None and opened.keep_cache:
                    return self._open_reply(unique, h.nodeid)
                if self.zero_message_open and opened.keep_cache:
                    # The kernel then opens every file without an OPEN, a FLUSH or a RELEASE,
                    # and keeps their page cache: three round trips less per file.
                    raise FuseReplyError(errno.ENOSYS)
                flags = kp.FOPEN_KEEP_CACHE if opened.keep_cache else 0
                return kp.reply(unique, kp.encode_open_out(opened.fh, flags))
            case Opcode.OPENDIR:
                kp.parse_open_in(body)
                opened = handlers.opendir(h.nodeid)
                if self.zero_message_opendir:
                    # The kernel then opens every directory without an OPENDIR or a
                    # RELEASEDIR and caches every listing (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR):
                    # a warm walk makes no request at all. The one listing that changes, the
                    # root of a multi-layer mount, is dropped from that cache at every attach
                    # and detach (``invalidate_listing``).
                    raise FuseReplyError(errno.ENOSYS)
                # A listing that never changes is read from us once and then from the page
                # cache. FOPEN_CACHE_DIR needs FOPEN_KEEP_CACHE, or the kernel drops it at open.
                flags = kp.FOPEN_CACHE_DIR | kp.FOPEN_KEEP_CACHE if opened.keep_cache else 0
                return kp.reply(unique, kp.encode_open_out(opened.fh, flags))
            case Opcode.READDIR | Opcode.READDIRPLUS:
                read = kp.parse_read_in(body)
                # The node, not read.fh, as for READ: a directory opened without an OPENDIR
                # has handle 0.
                listing = self._listing(h.nodeid, read, plus=h.opcode == Opcode.READDIRPLUS)
                return kp.reply(unique, listing)
            case Opcode.GETXATTR:
                size, name = kp.parse_getxattr_in(body)
                return kp.reply(unique, _sized(handlers.getxattr(h.nodeid, name), size))
            case Opcode.LISTXATTR:
                size, _ = kp.parse_getxattr_in(body)
                names = kp.xattr_names(handlers.listxattr(h.nodeid))
                return kp.reply(unique, _sized(names, size))
            case Opcode.STATFS:
                return kp.reply(unique, kp.encode_statfs_out(handlers.statfs()))
            case Opcode.ACCESS:
                handlers.access(h.nodeid, kp.parse_access_in(body))
                return kp.reply(unique)
            case Opcode.RELEASE if self.passthrough is not None:
                self.passthrough.release(h.nodeid, kp.parse_release_in(body))
                return kp.reply(unique)
            case Opcode.RELEASE | Opcode.RELEASEDIR | Opcode.DESTROY:
                return kp.reply(unique)  # handles are inode numbers: nothing to free
            case Opcode.FLUSH:
                # Nothing is ever written. ENOSYS tells the kernel to stop sending FLUSH at
                # every close, which it has understood since FLUSH exists.
                raise FuseReplyError(errno.ENOSYS)
            case Opcode.INIT:
                init = kp.parse_init_in(body)
                use_passthrough = self._passthrough_wanted is not None and _offers_passthrough(init)
                reply = _init_reply(init, passthrough=use_passthrough)
                if use_passthrough:
                    # Passthrough is decided at OPEN, so OPEN must keep coming: no
                    # zero-message opens on this connection.
                    self.passthrough = self._passthrough_wanted
                else:
                    self.zero_message_open = bool(init.flags & kp.FUSE_NO_OPEN_SUPPORT)
                # Linux 5.1 and later offer both, Debian 12's 6.1 included. Without
                # FUSE_AUTO_INVAL_DATA a cached empty root listing would outlive an attach.
                self.zero_message_opendir = _offers_zero_message_opendir(init)
                log.info("fuse init major=%d minor=%d passthrough=%s", init.major, init.minor,
                         _passthrough_state(self._passthrough_wanted, init))
                return kp.reply(unique, reply)
            case opcode if opcode in _WRITES:
                raise FuseReplyError(errno.EROFS)
            case _:
                raise FuseReplyError(errno.ENOSYS)

    def _open_reply(self, unique: int, inode: int) -> bytes:
        """A file of a passthrough connection: onto its verified copy when it has one and no
        cached open of it is left, otherwise from the page cache (``fusefs.fuse.passthrough``)."""
        assert self.passthrough is not None
        opening = self.passthrough.open(inode)
        if opening.backing_id is None:
            return kp.reply(unique, kp.encode_open_out(opening.fh, kp.FOPEN_KEEP_CACHE))
        return kp.reply(
            unique, kp.encode_open_out(opening.fh, kp.FOPEN_PASSTHROUGH, opening.backing_id)
        )

    def _listing(self, inode: int, read: kp.ReadIn, *, plus: bool) -> bytes:
        pieces: list[bytes] = []
        used = 0

        def take(name: bytes, attrs: Attributes, next_offset: int) -> bool:
            nonlocal used
            if plus:
                piece = kp.encode_direntplus(attrs, next_offset, name)
            else:
                piece = kp.encode_dirent(attrs.ino, next_offset, attrs.mode, name)
            if used + len(piece) > read.size:
                return False
            pieces.append(piece)
            used += len(piece)
            return True

        self._handlers.readdir(inode, read.offset, take)
        return b"".join(pieces)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Tell the kernel that ``name`` left ``parent``. The write runs on a worker thread:
        the kernel may wait for a lookup in ``parent`` that this very server has to answer."""
        nursery = self._nursery
        if nursery is None:
            return
        notification = kp.encode_inval_entry(parent, name)
        nursery.start_soon(trio.to_thread.run_sync, self._write_notification, notification)

    def invalidate_listing(self, inode: int) -> None:
        """Tell the kernel to drop what it cached of directory ``inode``: its listing, which it
        keeps for every directory on a connection with zero-message opendirs, and its
        attributes. Written at once, from the caller's thread: no request of this server can be
        answered between the caller's change and the kernel learning of it, so no one who saw
        the change (a lookup of a new layer) lists the old directory. Unlike
        ``invalidate_entry`` this takes no inode lock in the kernel and waits for no request."""
        if self._nursery is None:
            return
        self._write_notification(kp.encode_inval_inode(inode))

    def _write_notification(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except OSError as exc:  # only a cache hint: the lookup fails with ENOENT anyway
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("entry invalidation failed error=%r", exc)


def _parse(request: bytes) -> tuple[kp.InHeader, memoryview] | None:
    """The header and body of a request that gets a reply; None for the others."""
    try:
        header = kp.parse_in_header(request)
    except kp.ProtocolError as exc:
        log.error("fuse request unreadable error=%s", exc)
        return None
    if header.opcode in _NO_REPLY:
        return None
    return header, memoryview(request)[kp.IN_HEADER_SIZE :]


def _error_reply(header: kp.InHeader, exc: Exception) -> bytes:
    """The protocol's error boundary: never lose the server to one request."""
    if isinstance(exc, FuseReplyError):
        return kp.error_reply(header.unique, exc.errno)
    if isinstance(exc, kp.ProtocolError):
        log.error("fuse request malformed opcode=%d error=%s", header.opcode, exc)
    else:
        log.error("fuse request failed opcode=%d nodeid=%d error=%r",
                  header.opcode, header.nodeid, exc)
    return kp.error_reply(header.unique, errno.EIO)


def _opcode(request: bytes) -> int:
    return _OPCODE.unpack_from(request, 4)[0] if len(request) >= 8 else 0


def _sized(value: bytes, size: int) -> bytes:
    """GETXATTR/LISTXATTR: size 0 asks for the length; a short buffer is ERANGE."""
    if size == 0:
        return kp.encode_xattr_size(len(value))
    if len(value) > size:
        raise FuseReplyError(errno.ERANGE)
    return value


def _offers_passthrough(init: kp.InitIn) -> bool:
    """Whether the kernel offers FUSE passthrough: Linux 6.9+ built with it. Debian 12's 6.1
    offers no such bit, and a kernel without FUSE_INIT_EXT has no flags2 at all."""
    return bool(init.flags & kp.FUSE_INIT_EXT and init.flags & kp.FUSE_PASSTHROUGH)


def _offers_zero_message_opendir(init: kp.InitIn) -> bool:
    wanted = kp.FUSE_NO_OPENDIR_SUPPORT | kp.FUSE_AUTO_INVAL_DATA
    return init.flags & wanted == wanted


def _passthrough_state(wanted: Passthrough | None, init: kp.InitIn) -> str:
    if wanted is None:
        return "off"
    return "on" if _offers_passthrough(init) else "unavailable"


def _init_reply(init: kp.InitIn, *, passthrough: bool = False) -> bytes:
    if init.major != kp.KERNEL_VERSION or init.minor < kp.KERNEL_MINOR_VERSION:
        # The struct sizes we write need 7.31 or later; an older kernel is refused.
        raise FuseReplyError(errno.EPROTO)
    flags = init.flags & _INIT_FLAGS
    if passthrough:
        flags |= kp.FUSE_INIT_EXT | kp.FUSE_PASSTHROUGH
    return kp.encode_init_out(
        minor=kp.KERNEL_MINOR_VERSION,
        max_readahead=init.max_readahead,
        flags=flags,
        max_write=MAX_WRITE,
        max_pages=MAX_PAGES,
        max_stack_depth=MAX_STACK_DEPTH if passthrough else 0,
    )
