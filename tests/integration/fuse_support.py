"""Helpers for the filesystem tests: an in-memory fake layer (index + blob) and a FUSE server
run in a subprocess with guaranteed teardown.

The fake layer compresses each chunk as its own gzip member (what eStargz does), so it can be
decoded by the fake decoder here and by the real ``fusefs.formats.decode_chunk``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fusefs.index import ChunkRef, Codec, EntryAttr, EntryKind

REPO = Path(__file__).resolve().parents[2]
LAZYSNAP = REPO / ".venv" / "bin" / "lazysnap"

_TYPE_BITS = {
    EntryKind.DIR: stat.S_IFDIR,
    EntryKind.REG: stat.S_IFREG,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
}


@dataclass
class FakeEntry:
    path: str
    kind: EntryKind = EntryKind.REG
    perm: int = 0o644
    content: bytes = b""
    target: bytes = b""  # symlink target
    hardlink_to: str | None = None
    rdev: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_700_000_000_000_000_000
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class _Node:
    path: str
    kind: EntryKind
    perm: int
    uid: int
    gid: int
    mtime_ns: int
    rdev: int
    content: bytes
    target: bytes
    xattrs: dict[bytes, bytes]
    parent: int
    nlink: int = 1
    children: list[tuple[bytes, int]] = field(default_factory=list)
    chunks: list[ChunkRef] = field(default_factory=list)


class FakeIndex:
    """A LayerIndex over a list of FakeEntry, with a gzip-member-per-chunk blob."""

    def __init__(
        self,
        entries: Sequence[FakeEntry],
        *,
        chunk_size: int = 64 * 1024,
        with_digests: bool = True,
        prefetch_paths: Sequence[str] = (),
        corrupt_digest_of: str | None = None,
        toc_trusted: bool = False,
    ) -> None:
        self._toc_trusted = toc_trusted
        self._nodes: list[_Node] = [
            _Node("", EntryKind.DIR, 0o755, 0, 0, 0, 0, b"", b"", {}, 0, nlink=2)
        ]
        by_path: dict[str, int] = {"": 0}
        for e in entries:
            parent_path = e.path.rpartition("/")[0]
            if parent_path not in by_path:
                raise ValueError(f"parent of {e.path} must come first")
            parent = by_path[parent_path]
            name = e.path.rpartition("/")[2].encode()
            if e.hardlink_to is not None:
                target = by_path[e.hardlink_to]
                self._nodes[target].nlink += 1
                self._nodes[parent].children.append((name, target))
                continue
            node_id = len(self._nodes)
            self._nodes.append(
                _Node(
                    e.path,
                    e.kind,
                    e.perm,
                    e.uid,
                    e.gid,
                    e.mtime_ns,
                    e.rdev,
                    e.content,
                    e.target,
                    dict(e.xattrs),
                    parent,
                    nlink=2 if e.kind == EntryKind.DIR else 1,
                )
            )
            by_path[e.path] = node_id
            self._nodes[parent].children.append((name, node_id))
            if e.kind == EntryKind.DIR:
                self._nodes[parent].nlink += 1
        # Blob: prioritized files first, then a landmark boundary, then everything else.
        order = [by_path[p] for p in prefetch_paths]
        order += [
            i for i, n in enumerate(self._nodes) if n.kind == EntryKind.REG and i not in order
        ]
        blob = bytearray(b"HEADER--")  # something before the first chunk, like a tar header
        self._prefetch_end: int | None = None
        self.files_in_blob_order: list[int] = []
        for position, node_id in enumerate(order):
            if position == len(prefetch_paths) and prefetch_paths:
                self._prefetch_end = len(blob)
            node = self._nodes[node_id]
            if not node.content:
                continue
            self.files_in_blob_order.append(node_id)
            for file_offset in range(0, len(node.content), chunk_size):
                data = node.content[file_offset : file_offset + chunk_size]
                member = gzip.compress(data, mtime=0)
                digest = "sha256:" + hashlib.sha256(data).hexdigest() if with_digests else None
                if node.path == corrupt_digest_of:
                    digest = "sha256:" + "0" * 64
                node.chunks.append(
                    ChunkRef(file_offset, len(data), len(blob), len(blob) + len(member), 0, digest)
                )
                blob += member
                blob += b"pad"  # bytes between chunks (the next tar header in eStargz)
        if prefetch_paths and self._prefetch_end is None:
            self._prefetch_end = len(blob)
        blob += b"TOC-AND-FOOTER"
        self.blob_bytes = bytes(blob)
        self.by_path = by_path

    @property
    def codec(self) -> Codec:
        return Codec.GZIP

    @property
    def entry_count(self) -> int:
        return len(self._nodes)

    @property
    def toc_digest(self) -> str:
        return "sha256:" + "1" * 64

    @property
    def prefetch_end(self) -> int | None:
        return self._prefetch_end

    @property
    def toc_trusted(self) -> bool:
        return self._toc_trusted

    def attr(self, entry: int) -> EntryAttr:
        n = self._nodes[entry]
        size = len(n.content) if n.kind == EntryKind.REG else len(n.target)
        if n.kind not in (EntryKind.REG, EntryKind.SYMLINK):
            size = 0
        return EntryAttr(
            n.kind, _TYPE_BITS[n.kind] | n.perm, n.uid, n.gid, size, n.mtime_ns, n.rdev, n.nlink
        )

    def lookup(self, parent: int, name: bytes) -> int | None:
        for child_name, child in self._nodes[parent].children:
            if child_name == name:
                return child
        return None

    def children(self, directory: int) -> Sequence[tuple[bytes, int]]:
        return self._nodes[directory].children

    def parent(self, entry: int) -> int:
        return self._nodes[entry].parent

    def path(self, entry: int) -> str:
        return self._nodes[entry].path

    def readlink(self, entry: int) -> bytes:
        return self._nodes[entry].target

    def xattrs(self, entry: int) -> dict[bytes, bytes]:
        return dict(self._nodes[entry].xattrs)

    def chunks(self, entry: int) -> Sequence[ChunkRef]:
        return self._nodes[entry].chunks

    def file_entries(self) -> Sequence[int]:
        return self.files_in_blob_order


class FakeBlob:
    """An in-memory BlobReader that records its requests and can be made to fail."""

    def __init__(self, data: bytes, *, digest: str | None = None) -> None:
        self.data = data
        self._digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        self.requests: list[tuple[int, int]] = []
        self.fail = False
        self.gate: object | None = None  # a trio.Event the test sets to let reads finish

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def digest(self) -> str:
        return self._digest

    async def read_at(self, offset: int, length: int) -> bytes:
        import trio  # noqa: PLC0415 (keep this module importable from sync tests)

        self.requests.append((offset, length))
        if isinstance(self.gate, trio.Event):
            await self.gate.wait()
        else:
            await trio.sleep(0)
        if self.fail:
            raise OSError("injected blob failure")
        if offset + length > len(self.data):
            raise ValueError("range beyond blob")
        return self.data[offset : offset + length]


def fake_decoder(codec: Codec, compressed: bytes, ref: ChunkRef) -> bytes:
    """Decode one chunk of a gzip-member blob (what fusefs.formats does for eStargz)."""
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(compressed, ref.inner_offset + ref.size)
    return out[ref.inner_offset : ref.inner_offset + ref.size]


# -- comparing trees ---------------------------------------------------------------------------

LANDMARKS = {".prefetch.landmark", ".no.prefetch.landmark"}


@dataclass(frozen=True)
class Seen:
    """What ``lstat``, ``readlink``, ``listxattr`` and ``read`` show for one name."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    nlink: int
    target: str
    xattrs: tuple[tuple[str, bytes], ...]
    content_sha: str
    link_group: str


def view(root: Path, *, from_tar: bool) -> dict[str, Seen]:
    """Every name under ``root``; for a ``tar -x`` tree, overlay whiteouts are translated the
    way the layer index presents them (``.wh.x`` -> a 0/0 char device ``x``, ``.wh..wh..opq``
    -> ``trusted.overlay.opaque=y`` on its directory)."""
    seen: dict[str, Seen] = {}
    groups: dict[int, str] = {}
    opaque: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if from_tar and name in LANDMARKS and dirpath == str(root):
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                # overlayfs lists a whiteout of its lowest layer but cannot look it up
                continue
            if from_tar and name == ".wh..wh..opq":
                opaque.add(os.path.relpath(dirpath, root))
                continue
            if from_tar and name.startswith(".wh."):
                rel = os.path.join(os.path.relpath(dirpath, root), name[4:]).removeprefix("./")
                seen[rel] = Seen(
                    stat.S_IFCHR, st.st_uid, st.st_gid, 0, st.st_mtime_ns, 0, 1, "", (), "", rel
                )
                continue
            xattrs = tuple(
                sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False)
                )
            )
            content = ""
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            group = groups.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) else rel
            seen[rel] = Seen(
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_mtime_ns,
                st.st_rdev,
                st.st_nlink,
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else "",
                xattrs,
                content,
                group,
            )
    for rel in opaque:
        old = seen[rel]
        xattrs = tuple(sorted((*old.xattrs, ("trusted.overlay.opaque", b"y"))))
        seen[rel] = Seen(**{**old.__dict__, "xattrs": xattrs})
    return seen


def normalise_groups(tree: dict[str, Seen]) -> dict[str, Seen]:
    """Hardlink groups named by their sorted first member (so both trees name them alike)."""
    members: dict[str, list[str]] = {}
    for path, s in tree.items():
        members.setdefault(s.link_group, []).append(path)
    first = {group: min(paths) for group, paths in members.items()}
    return {p: Seen(**{**s.__dict__, "link_group": first[s.link_group]}) for p, s in tree.items()}


# -- FUSE servers in a subprocess ------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=30)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    log: Path  # the server's stderr

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_mount(
    args: Sequence[str], mountpoint: Path, *, timeout: float = 60.0
) -> Iterator[Server]:
    """Start ``args`` (a FUSE server for ``mountpoint``), wait until mounted, always tear down:
    SIGTERM, then kill; ``fusermount3 -u -z`` if still mounted; the process is reaped."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    private_before = _private_mounts()
    log = mountpoint.with_name(mountpoint.name + ".log")
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(list(args), stdout=subprocess.DEVNULL, stderr=stderr)
    server = Server(proc, log)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {proc.returncode} before mounting: {server.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no mount at {mountpoint} after {timeout}s")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if is_mounted(mountpoint):
            force_unmount(mountpoint)
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)
        # A killed ``lazysnap mount IMAGE`` leaves its private FUSE mount behind.
        for leftover in _private_mounts() - private_before:
            force_unmount(Path(leftover))


def _private_mounts() -> set[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return {line.split()[1] for line in f if "/lazysnap-mount-" in line.split()[1]}


def lazysnap_mount_args(blob: Path, mountpoint: Path, *extra: str) -> list[str]:
    return [str(LAZYSNAP), "mount", "--blob", str(blob), str(mountpoint), *extra]


def python_args(*args: str) -> list[str]:
    return [sys.executable, *args]


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function under ``trio.run`` (fixtures pass through ``__wrapped__``)."""
    import trio  # noqa: PLC0415

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


# -- a FUSE server over fake layers, run as ``python -m tests.integration.fuse_support`` ----------

BIG = bytes(range(256)) * 1200  # 300 KiB: several 64 KiB chunks
# Over FUSE passthrough's 1 MiB minimum; 251 is prime, so no chunk repeats another.
PASSTHROUGH_BIG = (bytes(range(251)) * 8400)[: 2 << 20]

BASE_ENTRIES = [
    FakeEntry("bin", kind=EntryKind.DIR, perm=0o755),
    FakeEntry("bin/tool", perm=0o4755, content=b"#!/bin/sh\necho hi\n", uid=7, gid=8),
    FakeEntry("bin/alias", hardlink_to="bin/tool"),
    FakeEntry("link", kind=EntryKind.SYMLINK, perm=0o777, target=b"bin/tool"),
    FakeEntry("etc", kind=EntryKind.DIR, perm=0o755),
    FakeEntry("etc/keep", content=b"base keep\n"),
    FakeEntry("etc/old", content=b"base old\n"),
    FakeEntry("tmp", kind=EntryKind.DIR, perm=0o1777),
    FakeEntry("big", content=BIG, xattrs={b"user.note": b"hello"}),
    FakeEntry("bad", content=b"corrupt me" * 100),
    FakeEntry("doomed", content=b"deleted by the top layer\n"),
    FakeEntry("empty", content=b""),
    FakeEntry("null", kind=EntryKind.CHAR, perm=0o666, rdev=os.makedev(1, 3)),
    FakeEntry("pipe", kind=EntryKind.FIFO, perm=0o644),
    FakeEntry("caf\u00e9", content=b"unicode name\n"),
]

TOP_ENTRIES = [
    FakeEntry("doomed", kind=EntryKind.CHAR, perm=0o000, rdev=0),  # whiteout
    FakeEntry(
        "etc", kind=EntryKind.DIR, perm=0o755, xattrs={b"trusted.overlay.opaque": b"y"}
    ),  # opaque
    FakeEntry("etc/new", content=b"top new\n"),
]


def _serve_fake(
    mountpoint: Path, cache_dir: Path, *, multi: bool, libfuse: bool, start_empty: bool = False,
) -> None:
    """``start_empty``: attach nothing until SIGUSR2 attaches "top"."""
    import trio  # noqa: PLC0415

    from fusefs import LazyFilesystem  # noqa: PLC0415

    async def main() -> None:
        fs = LazyFilesystem(mountpoint, cache_dir, single_layer=not multi, decoder=fake_decoder,
                            libfuse=libfuse)
        async with trio.open_nursery() as nursery:

            async def control() -> None:
                """SIGTERM/SIGINT: unmount. SIGUSR1: write usage to <mountpoint>.usage.json
                and detach "top". SIGUSR2: attach "top" again."""
                wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
                with trio.open_signal_receiver(*wanted) as signals:
                    async for signum in signals:
                        if signum == signal.SIGUSR1:
                            await fs.writes_done()  # cached bytes count once on disk
                            usage = {i: dataclasses.asdict(fs.usage(i)) for i in fs.layer_ids()}
                            report = mountpoint.with_name(mountpoint.name + ".usage.json")
                            report.write_text(json.dumps(usage))
                            await fs.detach("top")
                        elif signum == signal.SIGUSR2:
                            await attach_top()
                        else:
                            fs.unmount()
                            return

            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                await fs.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            async def attach_top() -> None:
                top = FakeIndex(TOP_ENTRIES)
                await fs.attach("top", FakeBlob(top.blob_bytes), top, background_fetch=True)

            nursery.start_soon(control)
            await nursery.start(serve)
            if start_empty:
                return
            base = FakeIndex(BASE_ENTRIES, chunk_size=64 * 1024, corrupt_digest_of="bad")
            await fs.attach("base", FakeBlob(base.blob_bytes), base, background_fetch=False)
            if multi:
                await attach_top()

    trio.run(main)


if __name__ == "__main__":
    _serve_fake(Path(sys.argv[1]), Path(sys.argv[2]), multi="--multi" in sys.argv[3:],
                libfuse="--libfuse" in sys.argv[3:], start_empty="--start-empty" in sys.argv[3:])
