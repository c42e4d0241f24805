"""`lazysnap pull` with parallel pull against a real containerd 1.6: a plain gzip image of three
layers with whiteouts, an opaque directory, hard links, xattrs and set-user-ID files is
unpacked by lazysnap itself, runs, and its merged tree equals the one containerd's own unpack
into its overlayfs snapshotter gives (`ctr image pull` of the same image)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.client.chain import chain_ids
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry

pytestmark = [pytest.mark.root, pytest.mark.containerd, pytest.mark.registry, pytest.mark.slow]

CAPABILITY = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + bytes(12)  # CAP_NET_BIND_SERVICE


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    with running_daemon(short_tmp / "d") as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        yield daemon, containerd


class Tar:
    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
            mode: int = 0o644, **attrs: object) -> Tar:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 1_700_000_000 + len(name)
        for key, value in attrs.items():
            setattr(info, key, value)
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        self._tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return self

    def layer(self) -> oci.Layer:
        self._tar.close()
        return oci.gzip_layer(self._buffer.getvalue())


def image_layers() -> tuple[oci.Layer, ...]:
    # busybox first, then what the later layers change.
    with tarfile.open(fileobj=io.BytesIO(oci.busybox_tar())) as busybox:
        members = [(m, busybox.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
                   for m in busybox.getmembers()]
    first = Tar()
    for member, data in members:
        first.add(member.name, member.type, data, member.mode, linkname=member.linkname)
    first.add("data", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
    first.add("data/x", data=b"x from layer one\n", uid=1000, gid=1000)
    first.add("data/old", data=b"to be removed\n")
    first.add("data/big", data=os.urandom(3 << 20))
    first.add("data/hard-a", data=b"shared\n", mode=0o4755)
    first.add("data/hard-b", tarfile.LNKTYPE, linkname="data/hard-a", mode=0o4755)
    first.add("cache", tarfile.DIRTYPE, mode=0o755)
    first.add("cache/stale", data=b"stale\n")
    first.add("cap", data=b"#!\n", mode=0o755,
              pax_headers={"SCHILY.xattr.security.capability": CAPABILITY.decode(),
                           "SCHILY.xattr.user.origin": "layer one"})
    second = Tar()
    second.add("data", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
    second.add("data/.wh.old")
    second.add("data/x", data=b"x from layer two\n", uid=1000, gid=1000)
    second.add("cache", tarfile.DIRTYPE, mode=0o700)
    second.add("cache/.wh..wh..opq")
    second.add("cache/fresh", data=b"fresh\n")
    second.add("new", tarfile.DIRTYPE)
    second.add("new/one", data=b"one\n", mode=0o600)
    second.add("new/two", tarfile.LNKTYPE, linkname="new/one", mode=0o600)
    second.add("new/sym", tarfile.SYMTYPE, linkname="../data/x", mode=0o777)
    third = Tar().add("etc", tarfile.DIRTYPE, mode=0o755).add("etc/hello", data=b"hello\n")
    return (first.layer(), second.layer(), third.layer())


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What the file system shows of every entry: type, mode, owner, size, content, link
    target, device, xattrs, mtime of non-directories, and hard link groups."""
    entries: dict[str, tuple[object, ...]] = {}
    first_of_inode: dict[int, str] = {}
    for directory, names, files in os.walk(root):
        for name in sorted(names + files):
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            info = path.lstat()
            content: object = None
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            xattrs = {} if stat.S_ISLNK(info.st_mode) else {
                key: os.getxattr(path, key, follow_symlinks=False)
                for key in sorted(os.listxattr(path, follow_symlinks=False))
            }
            linked = first_of_inode.setdefault(info.st_ino, rel) if info.st_nlink > 1 and \
                not stat.S_ISDIR(info.st_mode) else rel
            mtime = None if stat.S_ISDIR(info.st_mode) else info.st_mtime_ns
            entries[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid,
                            info.st_gid, info.st_size if not stat.S_ISDIR(info.st_mode) else 0,
                            content, info.st_rdev, tuple(xattrs.items()), mtime, linked)
    return entries


@contextlib.contextmanager
def mounted_view(containerd: RunningContainerd, snapshotter: str, chain: str, target: Path
                 ) -> Iterator[Path]:
    key = f"view-{snapshotter}"
    out = containerd.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key,
                         chain).stdout
    mounts = json.loads(out)
    assert len(mounts) == 1, mounts
    mount = {key.lower(): value for key, value in mounts[0].items()}
    target.mkdir()
    options = ",".join(mount.get("options") or [])
    subprocess.run(["mount", "-t", mount["type"], "-o", options, mount["source"], str(target)],
                   check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
        containerd.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)


def test_parallel_pull_unpacks_like_containerd_and_runs(
    stack: tuple[Daemon, RunningContainerd], docker_registry: RunningRegistry, tmp_path: Path
) -> None:
    daemon, containerd = stack
    layers = image_layers()
    oci.write_layout(tmp_path / "layout", layers, cmd=("/bin/sh",))
    reference = f"{docker_registry.host}/test/parallel-pull:latest"
    oci.push_layout(tmp_path / "layout", "latest", reference)
    hosts_dir = containerd.workdir / "certs.d"
    hosts_dir.mkdir(exist_ok=True)

    pulled = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "pull", reference, "--address",
         str(containerd.address), "--namespace", containerd.namespace, "--hosts-dir",
         str(hosts_dir), "--snapshotter-address", str(daemon.address), "--parallel",
         "--log-level", "info"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr.count("pull direct-applied") == 3, pulled.stderr  # not containerd's
    assert pulled.stdout.count(" applied ") == 3, pulled.stdout
    # The blobs are in containerd's content store, as after any pull.
    check = containerd.ctr("images", "check").stdout
    assert "complete (4/4)" in check, check  # the config and the three layers

    ran = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference, "pp1",
                         "/bin/cat", "/data/x", "/etc/hello", "/cache/fresh")
    assert ran.stdout == "x from layer two\nhello\nfresh\n"

    # containerd's own unpack of the same blobs, into its overlayfs snapshotter.
    containerd.ctr("image", "pull", "--plain-http", reference)
    top = chain_ids([layer.diff_id for layer in layers])[-1]
    with mounted_view(containerd, "lazysnap", top, tmp_path / "lazysnap") as ours, \
            mounted_view(containerd, "overlayfs", top, tmp_path / "overlayfs") as theirs:
        expected = tree(theirs)
        actual = tree(ours)
    assert "data/old" not in expected and "cache/stale" not in expected  # the whiteouts worked
    assert expected["data/hard-b"][-1] == "data/hard-a"
    assert sorted(actual) == sorted(expected)
    different = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert different == {}
