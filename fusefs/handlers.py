"""The request handlers: a read-only view of every attached layer, in lazysnap's own types.

Two thin front ends call them: ``fusefs.pyfuse3_operations`` for a mount made with pyfuse3, and
``fusefs.fuse.server``, our own protocol server, for an adopted connection. Neither adds
logic of its own.

Only ``read`` may wait. Every other handler is a plain function that answers from memory: the
protocol server answers them in its reader loop, which reads nothing else meanwhile, so an
``await`` there would stall the whole mount. A test holds every handler to this. The one
exception is a lookup of a layer whose index is still being built: the handler raises
``LayerPending`` and the front end calls it again once the build ended, from a task of its own.

Error boundary: a handler raises only ``FuseReplyError``. Any other exception becomes EIO, is
counted on its layer and is logged once per operation, entry and error type.

Layers are immutable, so the kernel caches entries and attributes for a long time and files are
opened with ``keep_cache``: a warm read never reaches Python. Directory and file handles are the
inode number (see ``fusefs.inodes``), so there is no per-open state.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Concatenate, Final, ParamSpec, TypeVar

import trio

from fusefs.accesslog import AccessLog
from fusefs.cache import chunk_key
from fusefs.exec_prefetch import ExecPrefetch
from fusefs.fetcher import ChunkFetcher
from fusefs.first_reads import FirstReads
from fusefs.fuse.abi import Attributes, StatfsReply
from fusefs.index import EntryAttr, EntryKind
from fusefs.inodes import MOUNT_ROOT_INODE, InodeMap
from fusefs.layer import Layer
from fusefs.table import LayerTable
from fusefs.trace import TRACE

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 24 * 3600.0  # seconds; the tree of an attached layer never changes
ROOT_ATTR_TIMEOUT = 1.0  # layers come and go, so the kernel must ask again for the root
_BLOCK = 4096
_IO_BLOCK = 128 * 1024  # st_blksize: invites tools to read in large pieces
_NAME_MAX = 255
_LISTINGS = 8  # directories whose child lists are kept while they are being read

# The read-only rule, stated once. The mount is ``ro``, so the kernel refuses writes itself;
# this table is the defensive second refusal, used by both front ends. The names are those of
# the protocol's opcodes, lower case.
WRITE_OPERATIONS: Final = frozenset({
    "setattr", "symlink", "mknod", "mkdir", "unlink", "rmdir", "rename", "rename2", "link",
    "write", "create", "setxattr", "removexattr", "fallocate", "tmpfile", "copy_file_range",
})
READ_ONLY_ERRNO: Final = errno.EROFS


class FuseReplyError(Exception):
    """The request is answered with ``errno``; the only exception a handler raises."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(errno_value)
        self.errno = errno_value


class LayerPending(FuseReplyError):
    """The request names a layer whose index is still being built (``fusefs.pending``): the
    front end calls the handler again once ``ready`` is set, in a task of its own, so that other
    requests go on meanwhile. A front end that does not know this answers EIO, never a guess."""

    def __init__(self, ready: trio.Event) -> None:
        super().__init__(errno.EIO)
        self.ready = ready


@dataclass(frozen=True, slots=True)
class Opened:
    """The answer to an open or opendir: the handle, and whether the kernel may keep what it
    cached of the file's pages or of the directory's listing."""

    fh: int
    keep_cache: bool


@dataclass(frozen=True, slots=True)
class WholeFile:
    """A regular file every byte of which is in the chunk cache under a content digest:
    ``pieces()`` yields its content from offset 0 to ``size``, each piece checked against its
    chunk's digest as it is loaded (FUSE passthrough hands such a copy to the kernel)."""

    size: int
    pieces: Callable[[], AsyncIterator[bytes]]
    identity: tuple[str, int]  # the layer's digest and the entry: see ``file_identity``


# Called once per directory entry; returns False when the reply has no room for it.
DirectoryEntrySink = Callable[[bytes, Attributes, int], bool]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _boundary(
    operation: str,
) -> Callable[
    [Callable[Concatenate[LazyHandlers, int, _P], _R]],
    Callable[Concatenate[LazyHandlers, int, _P], _R],
]:
    """The error boundary of a metadata handler whose first argument is the inode it is about."""

    def wrap(
        handler: Callable[Concatenate[LazyHandlers, int, _P], _R],
    ) -> Callable[Concatenate[LazyHandlers, int, _P], _R]:
        def bounded(self: LazyHandlers, inode: int, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return handler(self, inode, *args, **kwargs)
            except FuseReplyError:
                raise
            except Exception as exc:
                raise self.failure(operation, inode, exc) from None

        return bounded

    return wrap


def _read_boundary(
    handler: Callable[[LazyHandlers, int, int, int], Awaitable[bytes]],
) -> Callable[[LazyHandlers, int, int, int], Awaitable[bytes]]:
    """The same boundary for ``read``, the one handler that awaits."""

    async def bounded(self: LazyHandlers, fh: int, offset: int, size: int) -> bytes:
        try:
            return await handler(self, fh, offset, size)
        except FuseReplyError:
            raise
        except Exception as exc:
            raise self.failure("read", fh, exc) from None

    return bounded


class LazyHandlers:
    """Handlers over a ``LayerTable``; ``LazyFilesystem`` changes the table."""

    def __init__(
        self,
        table: LayerTable,
        fetcher: ChunkFetcher,
        inodes: InodeMap,
        *,
        mount_time_ns: int,
        access_log: AccessLog | None = None,
        exec_prefetch: ExecPrefetch | None = None,
        first_reads: FirstReads | None = None,
    ) -> None:
        self._table = table
        self._first_reads = first_reads
        self._exec_prefetch = exec_prefetch
        self._fetcher = fetcher
        self._inodes = inodes
        self._mount_time_ns = mount_time_ns
        self._access_log = access_log
        self.errors = 0  # failures not attributable to a layer
        # A big directory is read in many readdir calls and the index builds its child list per
        # call, so the lists of the few directories being listed are kept.
        self._listings: OrderedDict[int, tuple[Layer, Sequence[tuple[bytes, int]]]] = OrderedDict()

    # -- resolving inodes and failures -------------------------------------------------------

    def _resolve(self, inode: int) -> tuple[Layer, int] | None:
        """The layer and entry of ``inode``; None for the root of a multi-layer mount.

        ESTALE for numbers of detached layers or entries the index does not have.
        """
        try:
            decoded = self._inodes.decode(inode)
        except ValueError:
            raise FuseReplyError(errno.ESTALE) from None
        if decoded is None:
            return None
        slot, entry = decoded
        layer = self._table.get(slot)
        if layer is None or entry >= layer.index.entry_count:
            raise FuseReplyError(errno.ESTALE)
        return layer, entry

    def failure(self, operation: str, inode: int, exc: Exception) -> FuseReplyError:
        """Count and log an unexpected exception once; the caller raises the EIO returned."""
        layer: Layer | None = None
        entry = -1
        try:
            resolved = self._resolve(inode)
            if resolved is not None:
                layer, entry = resolved
        except FuseReplyError:
            pass
        if layer is None:
            self.errors += 1
            log.error("fuse operation failed op=%s inode=%d error=%r", operation, inode, exc)
            return FuseReplyError(errno.EIO)
        layer.stats.errors += 1
        layer.stats.last_error = f"{operation}: {type(exc).__name__}: {exc}"
        if layer.should_log(operation, entry, exc):
            log.error(
                "fuse operation failed op=%s layer=%s digest=%s path=%s error=%r",
                operation,
                layer.layer_id,
                layer.digest,
                _safe_path(layer, entry),
                exc,
            )
        return FuseReplyError(errno.EIO)

    # -- attributes --------------------------------------------------------------------------

    def _attributes(self, inode: int, attr: EntryAttr) -> Attributes:
        return Attributes(
            ino=inode,
            mode=attr.mode,
            nlink=attr.nlink,
            uid=attr.uid,
            gid=attr.gid,
            rdev=attr.rdev,
            size=attr.size,
            blocks=(attr.size + 511) // 512,
            blksize=_IO_BLOCK,
            atime_ns=attr.mtime_ns,
            mtime_ns=attr.mtime_ns,
            ctime_ns=attr.mtime_ns,
            generation=0,
            entry_timeout=CACHE_TIMEOUT,
            attr_timeout=CACHE_TIMEOUT,
        )

    def _mount_root_attributes(self) -> Attributes:
        attr = EntryAttr(
            kind=EntryKind.DIR,
            mode=stat.S_IFDIR | 0o755,
            uid=0,
            gid=0,
            size=0,
            # One nanosecond later per layer attached or detached. A kernel that caches the
            # root's listing compares its mtime before reusing the listing, so a new mtime
            # is what makes it list the root again (see ``fusefs.fuse.server``).
            mtime_ns=self._mount_time_ns + self._table.changes,
            rdev=0,
            nlink=2 + len(self._table),
        )
        return replace(
            self._attributes(MOUNT_ROOT_INODE, attr), attr_timeout=ROOT_ATTR_TIMEOUT
        )

    def _attributes_of(self, inode: int) -> Attributes:
        resolved = self._resolve(inode)
        if resolved is None:
            return self._mount_root_attributes()
        layer, entry = resolved
        return self._attributes(inode, layer.index.attr(entry))

    # -- lookups and directories -------------------------------------------------------------

    @_boundary("lookup")
    def lookup(self, parent_inode: int, name: bytes) -> Attributes:
        inode = self._lookup_inode(parent_inode, name)
        if inode is None:
            raise FuseReplyError(errno.ENOENT)
        return self._attributes_of(inode)

    def _lookup_inode(self, parent_inode: int, name: bytes) -> int | None:
        resolved = self._resolve(parent_inode)
        if name == b".":
            return parent_inode
        if resolved is None:  # the root of a multi-layer mount: its children are layers
            if name == b"..":
                return MOUNT_ROOT_INODE
            slot = self._table.slot_of(name)
            if slot is None:
                pending = self._table.pending(name)
                if pending is None:
                    return None
                if pending.failure is not None:
                    raise FuseReplyError(errno.EIO)  # its index failed to build: no tree
                raise LayerPending(pending.ready)
            return self._inodes.inode(slot, 0)
        layer, entry = resolved
        if layer.index.attr(entry).kind != EntryKind.DIR:
            raise FuseReplyError(errno.ENOTDIR)
        if name == b"..":
            if entry == 0:
                return MOUNT_ROOT_INODE
            return self._inodes.inode(layer.slot, layer.index.parent(entry))
        child = layer.index.lookup(entry, name)
        return None if child is None else self._inodes.inode(layer.slot, child)

    @_boundary("getattr")
    def getattr(self, inode: int) -> Attributes:
        return self._attributes_of(inode)

    @_boundary("readlink")
    def readlink(self, inode: int) -> bytes:
        resolved = self._resolve(inode)
        if resolved is None:
            raise FuseReplyError(errno.EINVAL)
        layer, entry = resolved
        if layer.index.attr(entry).kind != EntryKind.SYMLINK:
            raise FuseReplyError(errno.EINVAL)
        return layer.index.readlink(entry)

    @_boundary("opendir")
    def opendir(self, inode: int) -> Opened:
        resolved = self._resolve(inode)
        if resolved is None:
            # The mount root lists the attached layers, which come and go.
            return Opened(fh=inode, keep_cache=False)
        layer, entry = resolved
        if layer.index.attr(entry).kind != EntryKind.DIR:
            raise FuseReplyError(errno.ENOTDIR)
        return Opened(fh=inode, keep_cache=True)

    @_boundary("readdir")
    def readdir(self, fh: int, start_id: int, sink: DirectoryEntrySink) -> None:
        """Hand ``sink`` each entry's name, attributes and next offset from ``start_id`` on,
        until it returns False or the directory ends.

        Offsets are stable. At the mount root an entry's offset is its layer's slot, so attaching
        or detaching a layer never shifts the others; in a layer directory it is the 1-based
        position.
        """
        resolved = self._resolve(fh)
        if resolved is None:
            for layer in self._table.layers():
                if layer.slot > start_id:
                    child = self._inodes.inode(layer.slot, 0)
                    attributes = self._attributes(child, layer.index.attr(0))
                    if not sink(os.fsencode(layer.layer_id), attributes, layer.slot):
                        return
            return
        layer, entry = resolved
        started = time.perf_counter()
        try:
            self._list(fh, layer, entry, start_id, sink)
        finally:
            layer.stats.meters.readdir_micros.observe((time.perf_counter() - started) * 1e6)

    def _list(
        self, fh: int, layer: Layer, entry: int, start_id: int, sink: DirectoryEntrySink
    ) -> None:
        children = self._children(fh, layer, entry)
        for position in range(start_id, len(children)):
            name, child_entry = children[position]
            child = self._inodes.inode(layer.slot, child_entry)
            if not sink(name, self._attributes(child, layer.index.attr(child_entry)), position + 1):
                return

    def _children(self, inode: int, layer: Layer, entry: int) -> Sequence[tuple[bytes, int]]:
        cached = self._listings.get(inode)
        if cached is not None and cached[0] is layer:
            self._listings.move_to_end(inode)
            return cached[1]
        # Listed in blob order, which follows the TOC, not by name. That is the order of the
        # directory the layer was made from. A walker that reads what it lists, like find, cp -r
        # or a scan, then misses forward through the blob, and readahead turns that into a few large
        # ranges. In name order the same walk jumps around the blob one small range at a time.
        children = sorted(layer.index.children(entry), key=_entry_id)
        self._listings[inode] = (layer, children)
        if len(self._listings) > _LISTINGS:
            self._listings.popitem(last=False)
        return children

    # -- files -------------------------------------------------------------------------------

    @_boundary("open")
    def open(self, inode: int, flags: int) -> Opened:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FuseReplyError(READ_ONLY_ERRNO)
        resolved = self._resolve(inode)
        if resolved is None:
            raise FuseReplyError(errno.EISDIR)
        layer, entry = resolved
        kind = layer.index.attr(entry).kind
        if kind == EntryKind.DIR:
            raise FuseReplyError(errno.EISDIR)
        if kind != EntryKind.REG:
            raise FuseReplyError(errno.ENXIO)  # devices and fifos are not opened here
        if self._exec_prefetch is not None:
            # An execve: fetch the program, its loader and libraries (started, not awaited).
            # The protocol server answers OPEN with ENOSYS after this (zero-message opens), so
            # later execs reach us only through their first page, in ``read``.
            self._exec_prefetch.opened(layer, entry, flags)
        return Opened(fh=inode, keep_cache=True)

    def whole_file(self, inode: int) -> WholeFile | None:
        """The content of ``inode`` if it is a regular file whose chunks all have a digest and
        are all in the chunk cache now; None otherwise (also for unknown inodes). Plain: it
        only looks at the index and the cache's key set."""
        try:
            resolved = self._resolve(inode)
        except FuseReplyError:
            return None
        if resolved is None:
            return None
        layer, entry = resolved
        attr = layer.index.attr(entry)
        if attr.kind != EntryKind.REG:
            return None
        chunks = layer.index.chunks(entry)
        cache = self._fetcher.cache
        position = 0
        for ref in chunks:
            if ref.file_offset != position:
                return None
            position += ref.size
            # A chunk without a digest is trusted only once its whole blob has been verified:
            # not enough to hand its file to the kernel for good.
            if not ref.zeros and (ref.digest is None or chunk_key(ref, layer.digest) not in cache):
                return None
        if position != attr.size:
            return None
        fetcher = self._fetcher

        async def pieces() -> AsyncIterator[bytes]:
            for number, ref in enumerate(chunks):
                # Verified bytes: the cache checks a chunk against its digest on every load.
                data = await fetcher.chunk(layer, entry, chunks, number)
                if len(data) != ref.size:
                    raise ValueError(f"chunk {number} of entry {entry} has a wrong size")
                yield data

        return WholeFile(size=attr.size, pieces=pieces, identity=(layer.digest, entry))

    def file_identity(self, inode: int) -> tuple[str, int] | None:
        """Which file ``inode`` names now, (layer digest, entry); None if none. A copy made for
        an inode is only ever handed out while the inode still names the same file."""
        try:
            resolved = self._resolve(inode)
        except FuseReplyError:
            return None
        return None if resolved is None else (resolved[0].digest, resolved[1])

    @_read_boundary
    async def read(self, fh: int, offset: int, size: int) -> bytes:
        resolved = self._resolve(fh)
        if resolved is None:
            raise FuseReplyError(errno.EISDIR)
        layer, entry = resolved
        if self._access_log is not None and layer.mark_accessed(entry):
            self._access_log.record(layer.layer_id, layer.index.path(entry), offset, size)
        if self._first_reads is not None:
            self._first_reads.read(layer, entry, offset, size)
        started = time.perf_counter()
        if TRACE.active:
            data = await TRACE.read(
                layer, entry, offset, size, lambda: self._fetcher.read(layer, entry, offset, size)
            )
        else:
            data = await self._fetcher.read(layer, entry, offset, size)
        layer.stats.meters.served(len(data), time.perf_counter() - started)
        if offset == 0 and self._exec_prefetch is not None:
            # The first page of an ELF file: the kernel's execve or the loader opening a
            # library. Its interpreter and libraries are fetched ahead of the loader.
            self._exec_prefetch.first_page(layer, entry, offset, data)
        return data

    # -- extended attributes -----------------------------------------------------------------

    @_boundary("getxattr")
    def getxattr(self, inode: int, name: bytes) -> bytes:
        resolved = self._resolve(inode)
        value = None if resolved is None else resolved[0].index.xattrs(resolved[1]).get(name)
        if value is None:
            raise FuseReplyError(errno.ENODATA)
        return value

    @_boundary("listxattr")
    def listxattr(self, inode: int) -> Sequence[bytes]:
        resolved = self._resolve(inode)
        if resolved is None:
            return []
        return list(resolved[0].index.xattrs(resolved[1]))

    # -- the filesystem ----------------------------------------------------------------------

    def statfs(self) -> StatfsReply:
        """Always answers: overlayfs refuses a lower layer whose statfs fails."""
        return self._statfs(MOUNT_ROOT_INODE)

    @_boundary("statfs")
    def _statfs(self, inode: int) -> StatfsReply:
        # The chunk cache's filesystem is where this mount's bytes land. kubelet warns
        # InvalidDiskCapacity about an image filesystem that reports no capacity. One statvfs
        # of a local directory: quick, and no await in the reader loop.
        directory = self._fetcher.cache.directory
        try:
            cache_fs = os.statvfs(directory)
        except OSError as exc:
            log.warning("statfs of the chunk cache failed dir=%s error=%r; reporting the "
                        "layers' sizes", directory, exc)
            layers = self._table.layers()
            return StatfsReply(
                blocks=sum((layer.blob.size + _BLOCK - 1) // _BLOCK for layer in layers),
                bfree=0,
                bavail=0,
                files=sum(layer.index.entry_count for layer in layers) + 1,
                ffree=0,
                bsize=_IO_BLOCK,
                namelen=_NAME_MAX,
                frsize=_BLOCK,
            )
        return StatfsReply(
            blocks=cache_fs.f_blocks,
            bfree=cache_fs.f_bfree,
            bavail=cache_fs.f_bavail,
            files=cache_fs.f_files,
            ffree=cache_fs.f_ffree,
            bsize=_IO_BLOCK,
            namelen=_NAME_MAX,
            frsize=cache_fs.f_frsize,
        )

    @_boundary("access")
    def access(self, inode: int, mask: int) -> None:
        """Only asked without default_permissions; the kernel checks the permission bits."""
        if mask & os.W_OK:
            raise FuseReplyError(READ_ONLY_ERRNO)


def _safe_path(layer: Layer, entry: int) -> str:
    try:
        return layer.index.path(entry)
    except Exception:
        return f"<entry {entry}>"


def _entry_id(child: tuple[bytes, int]) -> int:
    return child[1]
