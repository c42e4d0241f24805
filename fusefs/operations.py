"""The pyfuse3 request handlers: a read-only view of every attached layer.

Error boundary: only ``pyfuse3.FUSEError`` leaves a handler (anything else would tear the mount
down). Every other exception becomes EIO, is counted on its layer and logged once per
(operation, entry, error type) with the layer digest.

Layers are immutable, so entries and attributes are cached by the kernel for a long time and
files are opened with ``keep_cache``: a warm read never reaches Python. Directory and file
handles are the inode number (see ``fusefs.inodes``): no per-open state.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import pyfuse3

from fusefs.accesslog import AccessLog
from fusefs.fetcher import ChunkFetcher
from fusefs.index import EntryAttr, EntryKind
from fusefs.inodes import MOUNT_ROOT_INODE, InodeMap
from fusefs.layer import Layer
from fusefs.table import LayerTable

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 24 * 3600.0  # seconds; the tree of an attached layer never changes
_BLOCK = 4096
_IO_BLOCK = 128 * 1024  # st_blksize: invites tools to read in large pieces
_NAME_MAX = 255
_LISTINGS = 8  # directories whose child lists are kept while they are being read


class LazyOperations(pyfuse3.Operations):
    """Handlers over a ``LayerTable``; the table is changed by ``LazyFilesystem``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        table: LayerTable,
        fetcher: ChunkFetcher,
        inodes: InodeMap,
        *,
        mount_time_ns: int,
        access_log: AccessLog | None = None,
    ) -> None:
        super().__init__()
        self._table = table
        self._fetcher = fetcher
        self._inodes = inodes
        self._mount_time_ns = mount_time_ns
        self._access_log = access_log
        self.errors = 0  # failures not attributable to a layer
        # A big directory is read in many readdir calls; the index builds its child list per
        # call, so keep the lists of the few directories being listed (layers are immutable).
        self._listings: OrderedDict[int, tuple[Layer, Sequence[tuple[bytes, int]]]] = OrderedDict()

    # -- resolving inodes --------------------------------------------------------------------

    def _resolve(self, inode: int) -> tuple[Layer, int] | None:
        """The layer and entry of ``inode``; None for the root of a multi-layer mount.

        ESTALE for numbers of detached layers or entries the index does not have.
        """
        try:
            decoded = self._inodes.decode(inode)
        except ValueError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if decoded is None:
            return None
        slot, entry = decoded
        layer = self._table.get(slot)
        if layer is None or entry >= layer.index.entry_count:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return layer, entry

    def _failure(self, operation: str, inode: int, exc: Exception) -> pyfuse3.FUSEError:
        """Count and log an unexpected exception once; the caller raises the EIO returned."""
        layer: Layer | None = None
        entry = -1
        try:
            resolved = self._resolve(inode)
            if resolved is not None:
                layer, entry = resolved
        except pyfuse3.FUSEError:
            pass
        if layer is None:
            self.errors += 1
            log.error("fuse operation failed op=%s inode=%d error=%r", operation, inode, exc)
            return pyfuse3.FUSEError(errno.EIO)
        layer.stats.errors += 1
        if layer.should_log(operation, entry, exc):
            path = _safe_path(layer, entry)
            log.error(
                "fuse operation failed op=%s layer=%s digest=%s path=%s error=%r",
                operation,
                layer.layer_id,
                layer.digest,
                path,
                exc,
            )
        return pyfuse3.FUSEError(errno.EIO)

    # -- attributes --------------------------------------------------------------------------

    def _entry_attributes(self, inode: int, attr: EntryAttr) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = inode
        out.generation = 0
        out.entry_timeout = CACHE_TIMEOUT
        out.attr_timeout = CACHE_TIMEOUT
        out.st_mode = attr.mode
        out.st_nlink = attr.nlink
        out.st_uid = attr.uid
        out.st_gid = attr.gid
        out.st_rdev = attr.rdev
        out.st_size = attr.size
        out.st_blksize = _IO_BLOCK
        out.st_blocks = (attr.size + 511) // 512
        out.st_atime_ns = attr.mtime_ns
        out.st_mtime_ns = attr.mtime_ns
        out.st_ctime_ns = attr.mtime_ns
        return out

    def _mount_root_attributes(self) -> pyfuse3.EntryAttributes:
        attr = EntryAttr(
            kind=EntryKind.DIR,
            mode=stat.S_IFDIR | 0o755,
            uid=0,
            gid=0,
            size=0,
            mtime_ns=self._mount_time_ns,
            rdev=0,
            nlink=2 + len(self._table),
        )
        out = self._entry_attributes(MOUNT_ROOT_INODE, attr)
        # Layers come and go: the kernel must ask again for the root's own attributes.
        out.attr_timeout = 1.0
        return out

    def _attributes_of(self, inode: int) -> pyfuse3.EntryAttributes:
        resolved = self._resolve(inode)
        if resolved is None:
            return self._mount_root_attributes()
        layer, entry = resolved
        return self._entry_attributes(inode, layer.index.attr(entry))

    # -- lookups and directories -------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            inode = self._lookup_inode(parent_inode, name)
            if inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attributes_of(inode)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("lookup", parent_inode, exc) from None

    def _lookup_inode(self, parent_inode: int, name: bytes) -> int | None:
        resolved = self._resolve(parent_inode)
        if name == b".":
            return parent_inode
        if resolved is None:  # the root of a multi-layer mount: its children are layers
            if name == b"..":
                return MOUNT_ROOT_INODE
            slot = self._table.slot_of(name)
            return None if slot is None else self._inodes.inode(slot, 0)
        layer, entry = resolved
        if layer.index.attr(entry).kind != EntryKind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b"..":
            if entry == 0:
                return MOUNT_ROOT_INODE
            return self._inodes.inode(layer.slot, layer.index.parent(entry))
        child = layer.index.lookup(entry, name)
        return None if child is None else self._inodes.inode(layer.slot, child)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inodes are arithmetic: there is no per-inode state to drop.
        return None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self._attributes_of(inode)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("getattr", inode, exc) from None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            resolved = self._resolve(inode)
            if resolved is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            layer, entry = resolved
            if layer.index.attr(entry).kind != EntryKind.SYMLINK:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return layer.index.readlink(entry)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("readlink", inode, exc) from None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        try:
            resolved = self._resolve(inode)
            if resolved is not None:
                layer, entry = resolved
                if layer.index.attr(entry).kind != EntryKind.DIR:
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("opendir", inode, exc) from None

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            for name, attributes, next_id in self.directory_entries(fh, start_id):
                if not pyfuse3.readdir_reply(token, name, attributes, next_id):
                    return
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("readdir", fh, exc) from None

    def directory_entries(
        self, inode: int, start_id: int
    ) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """(name, attributes, offset of the next entry) from ``start_id`` on.

        Offsets are stable: the slot for layers at the mount root (so attaching or detaching a
        layer never shifts the others), the 1-based position for entries of a layer directory.
        """
        resolved = self._resolve(inode)
        if resolved is None:
            for layer in self._table.layers():
                if layer.slot > start_id:
                    child = self._inodes.inode(layer.slot, 0)
                    attributes = self._entry_attributes(child, layer.index.attr(0))
                    yield os.fsencode(layer.layer_id), attributes, layer.slot
            return
        layer, entry = resolved
        children = self._children(inode, layer, entry)
        for position in range(start_id, len(children)):
            name, child_entry = children[position]
            child = self._inodes.inode(layer.slot, child_entry)
            yield name, self._entry_attributes(child, layer.index.attr(child_entry)), position + 1

    def _children(self, inode: int, layer: Layer, entry: int) -> Sequence[tuple[bytes, int]]:
        cached = self._listings.get(inode)
        if cached is not None and cached[0] is layer:
            self._listings.move_to_end(inode)
            return cached[1]
        # Listed in blob order (entry ids follow the TOC), not by name: that is the order of the
        # directory the layer was made from, and a walker that reads what it lists (find, cp -r,
        # a scan) then misses forward through the blob, which readahead turns into few large
        # ranges; in name order the same walk jumps around the blob one small range at a time.
        children = sorted(layer.index.children(entry), key=_entry_id)
        self._listings[inode] = (layer, children)
        if len(self._listings) > _LISTINGS:
            self._listings.popitem(last=False)
        return children

    async def releasedir(self, fh: int) -> None:
        return None

    # -- files -------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise pyfuse3.FUSEError(errno.EROFS)
            resolved = self._resolve(inode)
            if resolved is None:
                raise pyfuse3.FUSEError(errno.EISDIR)
            layer, entry = resolved
            kind = layer.index.attr(entry).kind
            if kind == EntryKind.DIR:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if kind != EntryKind.REG:
                raise pyfuse3.FUSEError(errno.ENXIO)  # devices and fifos are not opened here
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("open", inode, exc) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            resolved = self._resolve(fh)
            if resolved is None:
                raise pyfuse3.FUSEError(errno.EISDIR)
            layer, entry = resolved
            if self._access_log is not None and layer.mark_accessed(entry):
                self._access_log.record(layer.layer_id, layer.index.path(entry), off, size)
            return await self._fetcher.read(layer, entry, off, size)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("read", fh, exc) from None

    async def release(self, fh: int) -> None:
        return None

    # -- extended attributes -----------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            resolved = self._resolve(inode)
            value = None if resolved is None else resolved[0].index.xattrs(resolved[1]).get(name)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("getxattr", inode, exc) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        try:
            resolved = self._resolve(inode)
            if resolved is None:
                return []
            return list(resolved[0].index.xattrs(resolved[1]))
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise self._failure("listxattr", inode, exc) from None

    # -- the filesystem ----------------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lower layer whose statfs fails, so this must always answer.
        try:
            layers = self._table.layers()
            out = pyfuse3.StatvfsData()
            out.f_bsize = _IO_BLOCK
            out.f_frsize = _BLOCK
            out.f_blocks = sum((layer.blob.size + _BLOCK - 1) // _BLOCK for layer in layers)
            out.f_bfree = 0
            out.f_bavail = 0
            out.f_files = sum(layer.index.entry_count for layer in layers) + 1
            out.f_ffree = 0
            out.f_favail = 0
            out.f_namemax = _NAME_MAX
            return out
        except Exception as exc:
            raise self._failure("statfs", MOUNT_ROOT_INODE, exc) from None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only called without default_permissions; permission bits are checked by the kernel.
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    # -- everything that would write: the filesystem is read-only ----------------------------

    async def setattr(self, *args: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: object) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: object) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: object) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: object) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)


def _safe_path(layer: Layer, entry: int) -> str:
    try:
        return layer.index.path(entry)
    except Exception:
        return f"<entry {entry}>"


def _entry_id(child: tuple[bytes, int]) -> int:
    return child[1]
