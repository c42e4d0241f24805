"""FUSE passthrough: files whose bytes are all verified in the chunk cache are read by the kernel
from a backing file, without a READ reaching us and from the backing file's own page cache.

Linux 6.9 and later (CONFIG_FUSE_PASSTHROUGH) offer FUSE_PASSTHROUGH in INIT. A file descriptor
registered with the ioctl FUSE_DEV_IOC_BACKING_OPEN on the ``/dev/fuse`` fd gets a backing id;
an OPEN answered with FOPEN_PASSTHROUGH and that id sends the file's reads and mmaps to it.

The backing file is a copy of the whole file, assembled from chunks checked against their
digests as they are loaded (``LazyHandlers.whole_file``) and written to an ``O_TMPFILE`` in the
cache directory: it has no name, so nothing but this process's fd (and, once registered, the
kernel) can reach it, and the fd handed to the kernel holds exactly the verified bytes. Residual
trust: root can still write to it through ``/proc/<pid>/fd`` or the block device, as it can to
the chunk cache itself.

The kernel keeps one IO mode per inode while it is open: an inode open in passthrough refuses a
cached open or another backing file, and an inode open in cached mode refuses a passthrough
open; the caller's open(2) then fails with EIO. So opens are counted per inode, by mode, and
RELEASE ends them: a file switches to passthrough only once its cached opens are all released,
and keeps its backing id while any passthrough open lasts.

Copies are made in the background after a cached open finds a file whole, for files of at least
``min_size`` bytes, within ``budget`` bytes; beyond it the least recently opened copies that no
open file uses are dropped (the kernel frees a copy once its last user is gone).

A daemon that stops and leaves its connection to the next one (``handover_state``) passes on
its backing ids and open counts, which the kernel still holds for it; the next daemon
``adopt``s them before it reads a request, so that the files open in passthrough open again
onto the same backing file and the ones open through the page cache stay there until closed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import trio

from fusefs.fuse import abi as kp
from fusefs.handlers import FuseReplyError, WholeFile

log = logging.getLogger(__name__)

# Below this, a file is read in a few requests once and then from the page cache: a copy on
# disk and an OPEN per open would cost more than passthrough saves.
DEFAULT_MIN_SIZE: Final = 1 << 20
DEFAULT_BUDGET: Final = 4 << 30  # bytes of copies on disk at a time
# Handles of the two kinds of open, so that RELEASE knows which count to lower. Reads find
# their file by node number, never by handle.
CACHED_FH: Final = 1
PASSTHROUGH_FH: Final = 2
# The depth we claim in INIT: one above the backing files (on a plain filesystem, depth 0),
# leaving room for the overlayfs containerd stacks on the mount (FILESYSTEM_MAX_STACK_DEPTH).
MAX_STACK_DEPTH: Final = 1


class BackingRegistry(Protocol):
    """The kernel's table of backing files: the ioctls on the /dev/fuse fd (faked in tests)."""

    def open(self, fd: int) -> int: ...

    def close(self, backing_id: int) -> None: ...


class DeviceBackingRegistry:
    """FUSE_DEV_IOC_BACKING_OPEN / _CLOSE on the connection's ``/dev/fuse`` fd."""

    def __init__(self, device_fd: int) -> None:
        self._fd = device_fd

    def open(self, fd: int) -> int:
        # A mutable buffer makes ioctl return the syscall's result, which is the backing id.
        argument = bytearray(kp.encode_backing_map(fd))
        return int(fcntl.ioctl(self._fd, kp.FUSE_DEV_IOC_BACKING_OPEN, argument, True))

    def close(self, backing_id: int) -> None:
        argument = bytearray(kp.encode_backing_id(backing_id))
        fcntl.ioctl(self._fd, kp.FUSE_DEV_IOC_BACKING_CLOSE, argument, True)


@dataclass(slots=True)
class _Counts:
    cached: int = 0
    passthrough: int = 0


@dataclass(frozen=True, slots=True)
class _Backing:
    backing_id: int
    size: int
    identity: tuple[str, int]


class HandoverError(ValueError):
    """A handed-over passthrough state that is not what ``handover_state`` writes."""


def _ints(value: object, count: int) -> list[int]:
    if not isinstance(value, list) or len(value) != count:
        raise HandoverError(f"expected a list of {count} values, got {value!r}")
    if not all(type(v) is int and v >= 0 for v in value):
        raise HandoverError(f"expected non-negative integers, got {value!r}")
    return value


def _rows(state: dict[str, object], key: str) -> list[object]:
    rows = state.get(key, [])
    if not isinstance(rows, list):
        raise HandoverError(f"passthrough state {key!r} is not a list")
    return rows


@dataclass(frozen=True, slots=True)
class Opening:
    """How to answer one OPEN: the handle, and the backing id when it is a passthrough open."""

    fh: int
    backing_id: int | None


class Passthrough:
    """Backing files of one connection, by inode, and the opens that use them."""

    def __init__(
        self,
        registry: BackingRegistry,
        whole_file: Callable[[int], WholeFile | None],
        identity: Callable[[int], tuple[str, int] | None],
        directory: Path,
        *,
        min_size: int = DEFAULT_MIN_SIZE,
        budget: int = DEFAULT_BUDGET,
        new_copies: bool = True,
    ) -> None:
        """``new_copies=False``: serve adopted backing files only (passthrough turned off in a
        daemon that took over a connection negotiated with it)."""
        self._registry = registry
        self._whole_file = whole_file
        self._identity = identity
        self._directory = directory
        self._min_size = min_size
        self._new_copies = new_copies
        self._budget = budget
        self._backing: OrderedDict[int, _Backing] = OrderedDict()
        self._bytes = 0
        self._opens: dict[int, _Counts] = {}
        self._copying: set[int] = set()
        self._refused: set[int] = set()  # inodes whose copy failed: never tried again
        self._nursery: trio.Nursery | None = None
        self.copies = 0  # backing files registered so far
        self.passthrough_opens = 0

    def start(self, nursery: trio.Nursery | None) -> None:
        """Copies are made in ``nursery``; without one (None: it closed), none are started."""
        self._nursery = nursery

    @property
    def backing_files(self) -> int:
        return len(self._backing)

    def open(self, inode: int) -> Opening:
        counts = self._opens.setdefault(inode, _Counts())
        backing = self._backing.get(inode)
        if backing is not None and self._identity(inode) != backing.identity:
            # The number names another file now (a layer slot reused): never its old bytes.
            if counts.passthrough:  # the kernel would refuse any other answer anyway
                raise FuseReplyError(errno.EIO)
            self._drop(inode)
            backing = None
        if backing is not None and counts.cached == 0:
            self._backing.move_to_end(inode)
            counts.passthrough += 1
            self.passthrough_opens += 1
            return Opening(PASSTHROUGH_FH, backing.backing_id)
        counts.cached += 1
        if backing is None:
            self._maybe_copy(inode)
        return Opening(CACHED_FH, None)

    def release(self, inode: int, fh: int) -> None:
        counts = self._opens.get(inode)
        if counts is None:
            return  # opened by a predecessor, or a handle we did not give
        if fh == PASSTHROUGH_FH and counts.passthrough > 0:
            counts.passthrough -= 1
        elif fh == CACHED_FH and counts.cached > 0:
            counts.cached -= 1
        if counts.cached == counts.passthrough == 0:
            del self._opens[inode]

    def handover_state(self) -> dict[str, object]:
        """The backing ids and open counts, as JSON, for the daemon that takes over the
        connection. Taken once requests are no longer read: nothing changes them after."""
        return {
            "backing": [
                [inode, b.backing_id, b.size, b.identity[0], b.identity[1]]
                for inode, b in self._backing.items()
            ],
            "opens": [[inode, c.cached, c.passthrough] for inode, c in self._opens.items()],
        }

    def open_counts(self) -> tuple[int, int]:
        """Files open now, and how many of them in passthrough (for a log line)."""
        return len(self._opens), sum(1 for c in self._opens.values() if c.passthrough)

    def adopt(self, state: object) -> None:
        """Go on from a predecessor's ``handover_state`` on the same connection: its backing
        files serve the opens of their inodes (while the inode names the same file), and its
        open counts are lowered by the RELEASEs of its opens (same handles). Before any request
        is read; raises HandoverError, adopting nothing, when ``state`` is malformed."""
        if not isinstance(state, dict):
            raise HandoverError(f"passthrough state is not an object: {state!r}")
        backing: OrderedDict[int, _Backing] = OrderedDict()
        for row in _rows(state, "backing"):
            if not isinstance(row, list) or len(row) != 5 or not isinstance(row[3], str):
                raise HandoverError(f"bad backing row {row!r}")
            inode, backing_id, size, entry = _ints([row[0], row[1], row[2], row[4]], 4)
            backing[inode] = _Backing(backing_id, size, (row[3], entry))
        opens = {}
        for row in _rows(state, "opens"):
            inode, cached, passthrough = _ints(row, 3)
            opens[inode] = _Counts(cached, passthrough)
        self._backing = backing
        self._bytes = sum(b.size for b in backing.values())
        self._opens = opens

    def _maybe_copy(self, inode: int) -> None:
        if (
            self._nursery is None
            or not self._new_copies
            or inode in self._copying
            or inode in self._refused
        ):
            return
        whole = self._whole_file(inode)
        if whole is None or whole.size < self._min_size or whole.size > self._budget:
            return
        self._copying.add(inode)
        self._nursery.start_soon(self._copy, inode, whole)

    async def _copy(self, inode: int, whole: WholeFile) -> None:
        try:
            fd = await trio.to_thread.run_sync(self._tmpfile)
        except OSError as exc:
            self._copying.discard(inode)
            self._refused.add(inode)
            log.warning("passthrough copy not made inode=%d error=%r", inode, exc)
            return
        try:
            written = 0
            async for piece in whole.pieces():
                await trio.to_thread.run_sync(_write_all, fd, piece)
                written += len(piece)
            if written != whole.size:
                raise ValueError(f"{written} bytes of a {whole.size}-byte file")
            self._make_room(whole.size)
            backing_id = self._registry.open(fd)
        except Exception as exc:  # a failed copy only means the page-cache path stays
            self._refused.add(inode)
            log.warning("passthrough copy not made inode=%d error=%r", inode, exc)
            return
        finally:
            self._copying.discard(inode)
            os.close(fd)  # once registered, the kernel holds its own reference
        self._backing[inode] = _Backing(backing_id, whole.size, whole.identity)
        self._bytes += whole.size
        self.copies += 1
        log.info("passthrough backing file registered inode=%d size=%d backing_id=%d",
                 inode, whole.size, backing_id, extra={"event": "fuse_passthrough_backing"})

    def _tmpfile(self) -> int:
        return os.open(self._directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def _make_room(self, size: int) -> None:
        """Drop the least recently opened copies no open file uses until ``size`` more fit."""
        for inode in list(self._backing):
            if self._bytes + size <= self._budget:
                return
            if inode in self._opens and self._opens[inode].passthrough:
                continue
            self._drop(inode)
        if self._bytes + size > self._budget:
            raise OSError(errno.ENOSPC, "passthrough budget used by open files")

    def _drop(self, inode: int) -> None:
        backing = self._backing.pop(inode)
        self._bytes -= backing.size
        try:
            self._registry.close(backing.backing_id)
        except OSError as exc:
            log.warning("passthrough backing file not closed backing_id=%d error=%r",
                        backing.backing_id, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
