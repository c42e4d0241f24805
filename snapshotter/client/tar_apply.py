"""Apply a layer's tar stream to a snapshot directory with containerd's semantics.

This follows containerd's ``archive.Apply`` as its diff service runs it for overlay mounts:

- whiteouts become what overlayfs understands (``overlay=True``): ``.wh.NAME`` a 0/0 character
  device named NAME, ``.wh..wh..opq`` the ``trusted.overlay.opaque`` xattr on its directory. On
  a bottom layer (a plain directory, ``overlay=False``) they remove what they name instead;
- an entry replaces what is at its path, except that a directory merges into a directory;
- a missing parent directory is created with the attributes of the nearest lower layer's
  directory of that name, else 0755 root;
- hard links point inside the layer; ownership, ``SCHILY.xattr.*`` records, modes and times
  are applied after the content, directory times once everything is written.

Paths never leave the root. A path whose parent is a symbolic link in this layer cannot be
resolved here the way containerd resolves it (inside the root), so it raises
``UnsupportedEntryError`` and the caller lets containerd apply the layer instead.

A root that is empty when the apply starts (a new snapshot's directory, the usual case) holds
only what this apply puts there, so what is at a path is tracked rather than asked of the file
system with ``lstat`` for every entry. Regular files get their metadata through the descriptor
they were written with, not by path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import shutil
import stat
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from snapshotter.client.tar_stream import ForwardReader
from snapshotter.errors import SnapshotterError

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
XATTR_PAX_PREFIX = "SCHILY.xattr."
DEFAULT_DIR_MODE = 0o755  # containerd's mode for a parent no layer describes
COPY_BUFFER = 1024 * 1024
# Small files are created by a few threads while the next entries are read: creating a file
# waits on the file system's journal far longer than it costs CPU, and those waits overlap.
# Entries that depend on a pending file (its path, a hard link to it) wait for it first.
WRITER_THREADS = 4
OFFLOAD_MAX_SIZE = 1024 * 1024  # larger files are written by the reading thread
MAX_PENDING = 64  # files in flight, so at most 64 MiB of file data is held
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW

# What is at a path of the root, as far as an entry's creation cares.
DIRECTORY, SYMLINK, OTHER = "directory", "symlink", "other"


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class UnsupportedEntryError(SnapshotterError):
    """An entry this applier does not handle the way containerd does; containerd must apply
    the layer."""


class BadLayerError(SnapshotterError):
    """A tar entry that no applier would accept (an unknown type, a link out of the layer)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return DIRECTORY
    return SYMLINK if stat.S_ISLNK(mode) else OTHER


def _is_empty(root: str) -> bool:
    with os.scandir(root) as entries:
        return next(entries, None) is None


def _relative(name: str) -> str:
    """``name`` cleaned and rooted, as containerd's ``filepath.Clean`` of ``/`` + name; ""
    names the root."""
    return posixpath.normpath("/" + name).lstrip("/")


class _Applier:
    def __init__(
        self, root: Path, overlay: bool, lowers: Sequence[Path], reader: ForwardReader
    ) -> None:
        self._root = str(root)
        self._reader = reader  # what tarfile reads: file data is read from it directly
        self._overlay = overlay
        self._lowers = [str(lower) for lower in lowers]
        # Set for a root that was empty: then ``_made`` knows what is at every path of it.
        self._fresh = _is_empty(self._root)
        self._made: dict[str, str] = {}  # rel -> DIRECTORY, SYMLINK or OTHER
        self._unpacked: set[str] = set()
        self._checked_dirs: set[str] = set()  # directories of this layer already walked
        self._dirs: list[tuple[str, tarfile.TarInfo]] = []
        self._writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="tar-apply")
        self._pending: dict[str, Future[None]] = {}
        self._order: deque[str] = deque()

    def _path(self, rel: str) -> str:
        return os.path.join(self._root, rel)

    def _settle(self, rel: str) -> None:
        """Wait for the pending creation of ``rel``, if there is one; raises its error."""
        future = self._pending.pop(rel, None)
        if future is not None:
            future.result()

    def _settle_all(self) -> None:
        while self._order:
            self._settle(self._order.popleft())

    def _submit(self, rel: str, data: bytes, member: tarfile.TarInfo) -> None:
        while len(self._pending) >= MAX_PENDING:
            self._settle(self._order.popleft())
        path = self._path(rel)
        self._pending[rel] = self._writers.submit(self._write_file, path, (data,), member)
        self._order.append(rel)

    def close(self) -> None:
        self._writers.shutdown(wait=True, cancel_futures=True)

    def _lookup(self, rel: str) -> str | None:
        """What is at ``rel`` (DIRECTORY, SYMLINK or OTHER), None for nothing."""
        self._settle(rel)
        if self._fresh:
            return self._made.get(rel)
        try:
            return _kind(os.lstat(self._path(rel)).st_mode)
        except FileNotFoundError:
            return None

    def _record(self, rel: str, kind: str) -> None:
        if self._fresh:
            self._made[rel] = kind

    def _forget(self, rel: str, kind: str) -> None:
        """``rel`` was removed, and with a directory everything below it."""
        if not self._fresh:
            return
        self._made.pop(rel, None)
        if kind == DIRECTORY:
            prefix = rel + "/"
            for below in [name for name in self._made if name.startswith(prefix)]:
                del self._made[below]

    def _check_parent(self, rel_parent: str) -> None:
        """Refuse a parent path that goes through a symbolic link; create missing parents."""
        if not rel_parent or rel_parent in self._checked_dirs:
            return
        current = ""
        for part in rel_parent.split("/"):
            current = f"{current}/{part}" if current else part
            kind = self._lookup(current)
            if kind is None:
                self._make_parent(current)
            elif kind == SYMLINK:
                raise UnsupportedEntryError(f"{current!r} is a symbolic link on an entry's path")
            elif kind != DIRECTORY:
                raise BadLayerError(f"{current!r} is not a directory but holds entries")
        self._checked_dirs.add(rel_parent)

    def _make_parent(self, rel: str) -> None:
        path = self._path(rel)
        for lower in self._lowers:
            try:
                info = os.lstat(os.path.join(lower, rel))
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                os.mkdir(path, 0o700)
                os.lchown(path, info.st_uid, info.st_gid)
                os.chmod(path, stat.S_IMODE(info.st_mode))
                os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
                self._record(rel, DIRECTORY)
                return
        os.mkdir(path, DEFAULT_DIR_MODE)
        os.chmod(path, DEFAULT_DIR_MODE)
        self._record(rel, DIRECTORY)

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        rel = _relative(member.name)
        if not rel:
            log.debug("tar-apply entry-is-root name=%s", member.name)
            return
        parent, base = posixpath.split(rel)
        self._check_parent(parent)
        path = self._path(rel)
        if base == OPAQUE_WHITEOUT:
            self._opaque(parent)
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = posixpath.join(parent, base[len(WHITEOUT_PREFIX):])
            self._settle(target)
            self._whiteout(target, member)
            return
        existing = self._lookup(rel)
        if existing is not None and not (existing == DIRECTORY and member.isdir()):
            self._remove(rel)
        if member.isreg() and member.size <= OFFLOAD_MAX_SIZE:
            self._submit(rel, b"".join(self._data(member, tar, OFFLOAD_MAX_SIZE)), member)
            self._record(rel, OTHER)
        else:
            self._record(rel, self._create(path, member, tar))
        self._unpacked.add(rel)
        if member.isdir():
            self._dirs.append((path, member))

    def _opaque(self, rel_dir: str) -> None:
        directory = self._path(rel_dir)
        if self._overlay:
            os.setxattr(directory, OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        # A plain directory: remove what earlier entries of this layer did not put there.
        self._settle_all()
        for name in os.listdir(directory):
            rel = posixpath.join(rel_dir, name)
            if rel not in self._unpacked:
                self._remove(rel)

    def _whiteout(self, rel_target: str, member: tarfile.TarInfo) -> None:
        target = self._path(rel_target)
        if self._overlay:
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            os.lchown(target, member.uid, member.gid)
            self._record(rel_target, OTHER)
            return
        self._remove(rel_target)

    def _remove(self, rel: str) -> None:
        path = self._path(rel)
        try:
            kind = _kind(os.lstat(path).st_mode)
        except FileNotFoundError:
            return
        if kind == DIRECTORY:
            self._settle_all()  # files may still be on their way into it
            shutil.rmtree(path)
            # What was walked below it is gone; rare enough to walk everything again.
            self._checked_dirs.clear()
        else:
            os.unlink(path)
        self._forget(rel, kind)

    def _create(self, path: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> str:
        """Create the entry at ``path``; returns what it is (DIRECTORY, SYMLINK or OTHER)."""
        mode = stat.S_IMODE(member.mode)
        kind = OTHER
        if member.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            kind = DIRECTORY
        elif member.isreg():
            self._write_file(path, self._data(member, tar, COPY_BUFFER), member)
            return kind
        elif member.issym():
            os.symlink(member.linkname, path)
            kind = SYMLINK
        elif member.islnk():
            target = _relative(member.linkname)
            if not target:
                raise BadLayerError(f"hard link {member.name!r} points at the root")
            self._check_parent(posixpath.dirname(target))
            self._settle(target)
            os.link(self._path(target), path, follow_symlinks=False)
            # A hard link to a symbolic link is a symbolic link: _check_parent must know, and
            # chmod must not follow it (out of the root). Hard links are few: ask.
            kind = _kind(os.lstat(path).st_mode)
        elif member.ischr() or member.isblk():
            device = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, device | mode, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, mode)
        else:
            raise BadLayerError(f"entry {member.name!r} has unhandled tar type {member.type!r}")
        self._set_metadata(path, member, symlink=kind == SYMLINK)
        return kind

    def _data(self, member: tarfile.TarInfo, tar: tarfile.TarFile, limit: int
              ) -> Iterator[bytes]:
        """A regular file's content, in pieces of at most ``limit`` bytes."""
        if member.sparse is not None:  # GNU sparse: tarfile's reader fills in the holes
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has a reader
            while piece := source.read(limit):
                yield piece
            return
        # Where tarfile left the reader after the member's headers: the data follows.
        self._reader.seek(member.offset_data)
        remaining = member.size
        while remaining > 0:
            piece = self._reader.read(min(remaining, limit))
            if not piece:
                raise BadLayerError(f"entry {member.name!r}: the tar ends inside its data")
            remaining -= len(piece)
            yield piece

    def _write_file(self, path: str, pieces: Iterable[bytes], member: tarfile.TarInfo) -> None:
        """Create a regular file from ``pieces`` and set its metadata through the descriptor."""
        fd = os.open(path, CREATE_FLAGS, 0o600)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            self._set_file_metadata(fd, path, member)
        finally:
            os.close(fd)

    def _set_file_metadata(self, fd: int, path: str, member: tarfile.TarInfo) -> None:
        """``_set_metadata`` for a regular file, through its open descriptor: no path lookups.
        The same order: chown, xattrs (chown drops security.capability), chmod, times."""
        os.fchown(fd, member.uid, member.gid)
        self._set_xattrs(fd, path, member)
        os.fchmod(fd, stat.S_IMODE(member.mode))
        mtime_ns = int(member.mtime * 1_000_000_000)
        os.utime(fd, ns=(_atime_ns(member, mtime_ns), mtime_ns))

    def _set_metadata(self, path: str, member: tarfile.TarInfo, *, symlink: bool) -> None:
        mode = stat.S_IMODE(member.mode)
        os.lchown(path, member.uid, member.gid)
        self._set_xattrs(path, path, member)
        if not symlink:
            # After chown, which clears the set-user-ID and set-group-ID bits, also of the
            # inode a hard link shares. containerd chmods a hard link only when its target name
            # exists relative to its own working directory, which is "/" in practice.
            os.chmod(path, mode)
        if member.isdir():
            return  # ``finish`` sets directory times, once nothing is written into them
        mtime_ns = int(member.mtime * 1_000_000_000)
        os.utime(path, ns=(_atime_ns(member, mtime_ns), mtime_ns), follow_symlinks=False)

    @staticmethod
    def _set_xattrs(target: str | int, path: str, member: tarfile.TarInfo) -> None:
        """``target``: ``path`` (a symbolic link is not followed) or its open descriptor."""
        for key, value in member.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            name = key[len(XATTR_PAX_PREFIX):]
            # tarfile decodes PAX values as UTF-8 with surrogateescape: this gives the bytes back.
            data = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, data)
                else:
                    os.setxattr(target, name, data, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in {errno.ENOTSUP, errno.EPERM}:
                    raise
                log.warning("tar-apply xattr-ignored path=%s name=%s error=%s",
                            path, name, errno.errorcode.get(exc.errno or 0, "?"))

    def finish(self) -> None:
        self._settle_all()
        # Writing into a directory changes its mtime: directory times go last.
        for path, member in self._dirs:
            mtime_ns = int(member.mtime * 1_000_000_000)
            os.utime(path, ns=(_atime_ns(member, mtime_ns), mtime_ns), follow_symlinks=False)


def _atime_ns(member: tarfile.TarInfo, mtime_ns: int) -> int:
    # containerd sets atime to the later of the PAX atime and mtime.
    raw = member.pax_headers.get("atime")
    try:
        atime_ns = int(float(raw) * 1_000_000_000) if raw else 0
    except ValueError:
        atime_ns = 0
    return max(atime_ns, mtime_ns)


def apply_tar(
    stream: Readable, root: Path, *, overlay: bool, lowers: Sequence[Path] = ()
) -> int:
    """Apply the tar read from ``stream`` to ``root``; returns the number of entries.

    ``lowers`` are the lower layers' directories, nearest first (for missing parents).
    """
    reader = ForwardReader(stream)
    applier = _Applier(root, overlay, lowers, reader)
    entries = 0
    try:
        # The random-access mode over a forward-only reader rather than the stream mode: see
        # tar_stream. Read from start to end, tarfile only seeks forward there.
        with tarfile.open(fileobj=cast(BinaryIO, reader), mode="r:") as tar:
            for member in tar:
                applier.apply(member, tar)
                entries += 1
        applier.finish()
    finally:
        applier.close()
    return entries
