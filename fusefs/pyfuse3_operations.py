"""``LazyHandlers`` as ``pyfuse3.Operations``: only type translation, no logic of its own.

pyfuse3 awaits every handler, but only ``read`` waits for anything: the others are plain
functions, made coroutines by ``_answered``, which also waits for a layer whose index is being
built (``LayerPending``) and asks again.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, ParamSpec, TypeVar

import pyfuse3

from fusefs.fuse.abi import Attributes
from fusefs.handlers import (
    READ_ONLY_ERRNO,
    WRITE_OPERATIONS,
    FuseReplyError,
    LayerPending,
    LazyHandlers,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _answered(method: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A metadata handler, a plain function, as the coroutine pyfuse3 awaits.
    ``FuseReplyError`` becomes the ``pyfuse3.FUSEError`` pyfuse3 answers with."""

    async def answered(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        while True:
            try:
                return method(*args, **kwargs)
            except LayerPending as pending:  # a layer whose index is being built: wait for it
                await pending.ready.wait()
            except FuseReplyError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None

    return answered


def _entry(a: Attributes) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = a.ino
    out.generation = a.generation
    out.entry_timeout = a.entry_timeout
    out.attr_timeout = a.attr_timeout
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_rdev = a.rdev
    out.st_size = a.size
    out.st_blksize = a.blksize
    out.st_blocks = a.blocks
    out.st_atime_ns = a.atime_ns
    out.st_mtime_ns = a.mtime_ns
    out.st_ctime_ns = a.ctime_ns
    return out


class Pyfuse3Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, handlers: LazyHandlers) -> None:
        super().__init__()
        self._h = handlers

    @_answered
    def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return _entry(self._h.lookup(parent_inode, name))

    @_answered
    def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return _entry(self._h.getattr(inode))

    @_answered
    def readlink(self, inode: int, ctx: Any) -> bytes:
        return self._h.readlink(inode)

    @_answered
    def opendir(self, inode: int, ctx: Any) -> int:
        return self._h.opendir(inode).fh  # pyfuse3 cannot ask the kernel to cache listings

    @_answered
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def reply(name: bytes, attributes: Attributes, next_id: int) -> bool:
            return bool(pyfuse3.readdir_reply(token, name, _entry(attributes), next_id))

        self._h.readdir(fh, start_id, reply)

    @_answered
    def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        opened = self._h.open(inode, flags)
        return pyfuse3.FileInfo(fh=opened.fh, keep_cache=opened.keep_cache)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return await self._h.read(fh, off, size)
        except FuseReplyError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    @_answered
    def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self._h.getxattr(inode, name)

    @_answered
    def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return self._h.listxattr(inode)

    @_answered
    def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = self._h.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize, out.f_namemax = s.bsize, s.frsize, s.namelen
        out.f_blocks, out.f_bfree, out.f_bavail = s.blocks, s.bfree, s.bavail
        out.f_files, out.f_ffree, out.f_favail = s.files, s.ffree, s.ffree
        return out

    @_answered
    def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self._h.access(inode, mode)
        return True

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes are arithmetic: no per-inode state to drop

    async def release(self, fh: int) -> None:
        return None  # handles are inode numbers: nothing to free

    async def releasedir(self, fh: int) -> None:
        return None


async def _refuse_write(*args: object) -> NoReturn:
    raise pyfuse3.FUSEError(READ_ONLY_ERRNO)


# The read-only rule of ``fusefs.handlers``, for every write pyfuse3 would dispatch.
for _name in WRITE_OPERATIONS:
    if hasattr(pyfuse3.Operations, _name):
        setattr(Pyfuse3Operations, _name, _refuse_write)
