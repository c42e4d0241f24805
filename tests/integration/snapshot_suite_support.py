"""Helpers for the snapshotter semantics tests: a gRPC client, real mounts, file-tree appliers.

The checks mirror containerd's snapshotter test suite (``core/snapshots/testsuite``): snapshots
are created over the real socket of a ``lazysnap serve`` subprocess, the returned mounts are
mounted with mount(2) the way containerd's ``mount.All`` does (including its compaction of long
``lowerdir`` lists), files are applied into them, and views are compared with a flat directory
to which the same changes were applied.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import ctypes.util
import datetime
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from google.protobuf import field_mask_pb2

from snapshotter._proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from tests.support.daemon import Daemon, running_daemon

TIMEOUT = 60.0
GC_ROOT = "containerd.io/gc.root"
SNAPSHOT_REF = "containerd.io/snapshot.ref"

# containerd's suite passes this label to every Prepare/View/Commit and expects it back.
OPT = {GC_ROOT: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


# -- daemon ----------------------------------------------------------------------------------


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    try:
        yield path
    finally:
        for _ in range(3):
            unmount_everything_under(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"cannot clean up {path}: still mounted: {mounts_under(path)}")


@contextlib.contextmanager
def daemon_in(workdir: Path) -> Iterator[Daemon]:
    with running_daemon(workdir) as daemon:
        yield daemon


# -- client ----------------------------------------------------------------------------------


class Client:
    """Thin typed wrapper over the Snapshots stub (the snapshotter field is set as containerd does)."""

    def __init__(self, stub: snapshots_pb2_grpc.SnapshotsStub, name: str = "lazysnap") -> None:
        self.stub = stub
        self.name = name

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        response = self.stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(
                snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
            ),
            timeout=TIMEOUT,
        )
        return list(response.mounts)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[mount_pb2.Mount]:
        response = self.stub.View(
            snapshots_pb2.ViewSnapshotRequest(
                snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
            ),
            timeout=TIMEOUT,
        )
        return list(response.mounts)

    def mounts(self, key: str) -> list[mount_pb2.Mount]:
        response = self.stub.Mounts(
            snapshots_pb2.MountsRequest(snapshotter=self.name, key=key), timeout=TIMEOUT
        )
        return list(response.mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.stub.Commit(
            snapshots_pb2.CommitSnapshotRequest(
                snapshotter=self.name, name=name, key=key, labels=dict(labels or {})
            ),
            timeout=TIMEOUT,
        )

    def remove(self, key: str) -> None:
        self.stub.Remove(
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.name, key=key), timeout=TIMEOUT
        )

    def stat(self, key: str) -> snapshots_pb2.Info:
        response = self.stub.Stat(
            snapshots_pb2.StatSnapshotRequest(snapshotter=self.name, key=key), timeout=TIMEOUT
        )
        return cast(snapshots_pb2.Info, response.info)

    def update(self, info: snapshots_pb2.Info, *paths: str) -> snapshots_pb2.Info:
        request = snapshots_pb2.UpdateSnapshotRequest(snapshotter=self.name, info=info)
        if paths:
            request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
        return cast(snapshots_pb2.Info, self.stub.Update(request, timeout=TIMEOUT).info)

    def list(self, *filters: str) -> list[snapshots_pb2.Info]:
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        infos: list[snapshots_pb2.Info] = []
        for response in self.stub.List(request, timeout=TIMEOUT):
            infos.extend(response.info)
        return infos

    def list_blocks(self, *filters: str) -> builtins.list[int]:
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters))
        return [len(r.info) for r in self.stub.List(request, timeout=TIMEOUT)]

    def usage(self, key: str) -> tuple[int, int]:
        response = self.stub.Usage(
            snapshots_pb2.UsageRequest(snapshotter=self.name, key=key), timeout=TIMEOUT
        )
        return response.size, response.inodes

    def cleanup(self) -> None:
        self.stub.Cleanup(snapshots_pb2.CleanupRequest(snapshotter=self.name), timeout=TIMEOUT)


def names(infos: Sequence[snapshots_pb2.Info]) -> list[str]:
    return sorted(i.name for i in infos)


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run a call expected to fail; return its status code and message."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded but an error was expected")


# -- mounting (what containerd's mount.All does) -------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | MS_REC),
    "nosuid": (False, MS_NOSUID), "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV), "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC), "exec": (True, MS_NOEXEC),
}
_mount_cwd_lock = threading.Lock()


def _sys_mount(source: str, target: str, fstype: str | None, flags: int, data: str) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                     flags, data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target} ({data[:200]!r}): "
                           f"{os.strerror(err)}")


def _common_dir_prefix(dirs: Sequence[str]) -> str:
    low, high = min(dirs), max(dirs)
    i = 0
    while i < min(len(low), len(high)) and low[i] == high[i]:
        i += 1
    return low[:i]


def compact_lowerdir(options: Sequence[str]) -> tuple[str, list[str]]:
    """containerd's compactLowerdirOption: lowerdirs relative to their common parent dir."""
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if index < 0:
        return "", list(options)
    dirs = options[index][len("lowerdir="):].split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = _common_dir_prefix(dirs)
    if not common:
        return "", list(options)
    common = os.path.dirname(common)
    if common in ("/", "."):
        return "", list(options)
    common += "/"
    if any(len(d) <= len(common) for d in dirs):
        return "", list(options)
    relative = [d[len(common):] for d in dirs]
    rest = [o for i, o in enumerate(options) if i != index]
    return common, [*rest, "lowerdir=" + ":".join(relative)]


def options_size(options: Sequence[str]) -> int:
    return sum(len(o) for o in options)


def mount_one(m: mount_pb2.Mount, target: Path) -> None:
    options = list(m.options)
    chdir = ""
    if m.type == "overlay" and options_size(options) >= PAGE_SIZE - 512:
        chdir, options = compact_lowerdir(options)
    flags = 0
    data: list[str] = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        else:
            data.append(option)
    fstype = None if m.type == "bind" else m.type
    if m.type == "bind":
        flags |= MS_BIND
    if chdir:
        with _mount_cwd_lock:
            saved = os.getcwd()
            os.chdir(chdir)
            try:
                _sys_mount(m.source, str(target), fstype, flags, ",".join(data))
            finally:
                os.chdir(saved)
    else:
        _sys_mount(m.source, str(target), fstype, flags & ~MS_RDONLY if flags & MS_BIND else flags,
                   ",".join(data))
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY: containerd remounts it read-only afterwards.
        _sys_mount("", str(target), None, MS_REMOUNT | MS_BIND | MS_RDONLY, "")


def unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) != 0:
        _libc.umount2(str(target).encode(), MNT_DETACH)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as mountinfo:
        # mountinfo escapes spaces and the like as \040
        points = [line.split()[4].encode().decode("unicode_escape") for line in mountinfo]
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")),
                  key=len, reverse=True)


def unmount_everything_under(path: Path) -> None:
    for point in mounts_under(path):
        _libc.umount2(point.encode(), MNT_DETACH)


@contextlib.contextmanager
def mounted(mounts: Sequence[mount_pb2.Mount], target: Path) -> Iterator[Path]:
    assert mounts, "expected mounts to have entries"
    target.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            mount_one(m, target)
            done += 1
        yield target
    finally:
        for _ in range(done):
            unmount(target)


# -- appliers (continuity's fstest, re-implemented) ----------------------------------------

Applier = Callable[[Path], None]


def _inside(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def create_file(name: str, content: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = _inside(root, name)
        path.write_bytes(content)
        os.chmod(path, mode)
    return apply


def create_dir(name: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        path = _inside(root, name)
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
    return apply


def remove_all(name: str) -> Applier:
    def apply(root: Path) -> None:
        path = _inside(root, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return apply


def chown(name: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(_inside(root, name), uid, gid)
    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(_inside(root, old), _inside(root, new))
    return apply


def rename(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.rename(_inside(root, old), _inside(root, new))
    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for applier in appliers:
            applier(root)
    return apply


# -- comparing trees (what fstest.CheckDirectoryEqual looks at) ----------------------------


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    content: str  # sha256 of a file, target of a symlink, "" otherwise
    links: tuple[str, ...]  # other paths in the tree naming the same inode (hard links)


def tree(root: Path) -> dict[str, Entry]:
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.lstat(path)
    by_inode: dict[int, list[str]] = {}
    for rel, st in found.items():
        if stat.S_ISREG(st.st_mode):
            by_inode.setdefault(st.st_ino, []).append(rel)
    entries: dict[str, Entry] = {}
    for rel, st in found.items():
        entry = root / rel
        content = ""
        links: tuple[str, ...] = ()
        if stat.S_ISREG(st.st_mode):
            kind = "file"
            content = hashlib.sha256(entry.read_bytes()).hexdigest()
            links = tuple(sorted(p for p in by_inode[st.st_ino] if p != rel))
        elif stat.S_ISDIR(st.st_mode):
            kind = "dir"
        elif stat.S_ISLNK(st.st_mode):
            kind = "symlink"
            content = os.readlink(entry)
        else:
            kind = f"special:{stat.S_IFMT(st.st_mode):o}:{st.st_rdev}"
        entries[rel] = Entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, links)
    return entries


def assert_same_tree(expected: Path, actual: Path) -> None:
    want, got = tree(expected), tree(actual)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not (missing or extra or differ), (
        f"{actual} differs from {expected}: missing={missing} extra={extra} "
        f"differ={[(k, want[k], got[k]) for k in differ]}"
    )


def assert_tree_equals_applier(actual: Path, applier: Applier, scratch: Path) -> None:
    """fstest.CheckDirectoryEqualWithApplier: apply to an empty dir and compare."""
    flat = Path(tempfile.mkdtemp(prefix="expect", dir=scratch))
    try:
        applier(flat)
        assert_same_tree(flat, actual)
    finally:
        shutil.rmtree(flat)


# -- containerd's helpers.go, over gRPC ----------------------------------------------------


class Suite:
    """One test's snapshotter client and its scratch ("work") directory."""

    def __init__(self, client: Client, work: Path) -> None:
        self.client = client
        self.work = work
        self._seq = 0

    def unique(self, what: str) -> str:
        self._seq += 1
        return f"{what}-{self._seq}"

    def scratch(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.work))

    def apply_to_mounts(self, mounts: Sequence[mount_pb2.Mount], applier: Applier) -> None:
        target = self.scratch("prepare")
        with mounted(mounts, target):
            applier(target)
        target.rmdir()

    def create_snapshot(self, parent: str, applier: Applier) -> str:
        name = self.unique("layer")
        prepare = f"{name}-prepare"
        mounts = self.client.prepare(prepare, parent, OPT)
        self.apply_to_mounts(mounts, applier)
        self.client.commit(name, prepare, OPT)
        return name

    def check_snapshot(self, name: str, expected: Path) -> None:
        view = f"{name}-view"
        mounts = self.client.view(view, name, OPT)
        target = self.scratch("check")
        try:
            with mounted(mounts, target):
                assert_same_tree(expected, target)
        finally:
            self.client.remove(view)
            target.rmdir()

    def check_snapshots(self, *appliers: Applier) -> list[str]:
        """Chain one committed snapshot per applier; check each through a view."""
        flat = self.scratch("flat")
        parent = ""
        chain: list[str] = []
        for applier in appliers:
            name = self.create_snapshot(parent, applier)
            applier(flat)
            self.check_snapshot(name, flat)
            chain.append(name)
            parent = name
        shutil.rmtree(flat)
        return chain
