"""Real trees -> tar -> our writers -> ``lazysnap mount --blob`` == ``tar -x`` of the same tar.

Each mount is a ``lazysnap mount`` subprocess (pyfuse3's session is process-global); teardown
always unmounts and reaps it (``fuse_support.running_mount``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from fusefs.formats import load_layer_index, write_estargz, write_zstd_chunked
from fusefs.index import EntryKind
from tests.fusefs.formats_support import MemoryBlob, build_sample_tree, copy_stdlib_slice, gnu_tar
from tests.integration.fuse_support import (
    Seen,
    lazysnap_mount_args,
    normalise_groups,
    running_mount,
    view,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse]

KiB = 1024
CHUNK = 64 * KiB
MTIME_NS = 1_700_000_000 * 10**9


def build_tree(root: Path) -> Path:
    build_sample_tree(root)
    shutil.copy2("/bin/busybox", root / "busybox")  # ~2 MiB: many chunks
    os.link(root / "busybox", root / "usr" / "bin" / "sh")
    copy_stdlib_slice(root / "stdlib", limit=120)
    with open(root / "holes.bin", "wb") as f:  # a sparse file: tar stores its zeros
        f.seek(3 * CHUNK + 100)
        f.write(b"end of a file with holes")
    (root / "exactly-one-chunk").write_bytes(os.urandom(CHUNK))
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    return root


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Seen]]:
    """The tar of a real tree and what ``tar -x`` of it looks like."""
    base = tmp_path_factory.mktemp("layer")
    tar_bytes = gnu_tar(build_tree(base / "tree"))
    extracted = base / "extracted"
    extracted.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--same-owner",
            "--numeric-owner",
            "-p",
            "-C",
            str(extracted),
            "-xf",
            "-",
        ],
        input=tar_bytes,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return tar_bytes, normalise_groups(view(extracted, from_tar=True))


def write_blob(tar_bytes: bytes, fmt: str, out: Path, **options: object) -> Path:
    with open(out, "wb") as f:
        if fmt == "estargz":
            write_estargz(io.BytesIO(tar_bytes), f, chunk_size=CHUNK, **options)  # type: ignore[arg-type]
        else:
            write_zstd_chunked(
                io.BytesIO(tar_bytes), f, chunk_size=CHUNK, legacy=fmt == "zstd-legacy", **options
            )  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize(
    ("fmt", "background"),
    [("estargz", True), ("zstd", False), ("zstd-legacy", True)],
)
def test_mounted_blob_equals_tar_extract(
    layer: tuple[bytes, dict[str, Seen]], tmp_path: Path, fmt: str, background: bool
) -> None:
    tar_bytes, expected = layer
    blob = write_blob(tar_bytes, fmt, tmp_path / "layer.blob", prioritized=["busybox"])
    mnt = tmp_path / "mnt"
    access_log = tmp_path / "access.jsonl"
    extra = ["--access-log", str(access_log), "--cache-dir", str(tmp_path / "cache")]
    if not background:
        extra.append("--no-background-fetch")
    with running_mount(lazysnap_mount_args(blob, mnt, *extra), mnt):
        mounted = normalise_groups(view(mnt, from_tar=False))
        assert sorted(mounted) == sorted(expected)
        for path in expected:
            assert mounted[path] == expected[path], path
        # Hardlinks are one inode; the mount root is inode 1 with the layer's attributes.
        assert os.lstat(mnt / "busybox").st_ino == os.lstat(mnt / "usr/bin/sh").st_ino
        assert os.stat(mnt).st_ino == 1
        with open(mnt / "busybox", "rb") as f:  # a read in the middle of a multi-chunk file
            f.seek(5 * CHUNK - 10)
            middle = f.read(CHUNK + 20)
        assert middle == (mnt / "busybox").read_bytes()[5 * CHUNK - 10 : 6 * CHUNK + 10]
        st = os.statvfs(mnt)
        assert st.f_namemax == 255 and st.f_files > 100 and st.f_blocks > 0
        run = subprocess.run(
            [str(mnt / "busybox"), "echo", "lazy"], capture_output=True, timeout=30, check=True
        )
        assert run.stdout == b"lazy\n"

    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert lines, "the access log has lines for the files read"
    regular_groups = {
        s.link_group for s in expected.values() if stat.S_ISREG(s.mode) and s.size > 0
    }
    logged = [line["path"] for line in lines]
    assert len(logged) == len(set(logged)) == len(regular_groups)  # once per file
    for line in lines:
        assert set(line) == {"layer", "path", "offset", "size", "seconds"}
        assert line["offset"] >= 0 and line["size"] > 0 and line["seconds"] >= 0
        assert stat.S_ISREG(expected[line["path"]].mode)


def test_writes_are_refused_with_erofs(
    layer: tuple[bytes, dict[str, Seen]], tmp_path: Path
) -> None:
    blob = write_blob(layer[0], "estargz", tmp_path / "layer.blob")
    mnt = tmp_path / "mnt"
    with running_mount(lazysnap_mount_args(blob, mnt), mnt):
        attempts = [
            lambda: open(mnt / "etc/hostname", "r+b"),
            lambda: open(mnt / "new-file", "wb"),
            lambda: os.mkdir(mnt / "newdir"),
            lambda: os.unlink(mnt / "empty"),
            lambda: os.rename(mnt / "empty", mnt / "empty2"),
            lambda: os.chmod(mnt / "empty", 0o600),
            lambda: os.symlink("x", mnt / "sym"),
            lambda: os.setxattr(mnt / "empty", "user.x", b"1"),
            lambda: os.truncate(mnt / "etc/hostname", 0),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS


def test_corrupted_chunk_fails_with_eio_and_never_wrong_bytes(
    layer: tuple[bytes, dict[str, Seen]], tmp_path: Path
) -> None:
    blob = write_blob(layer[0], "estargz", tmp_path / "layer.blob")
    data = bytearray(blob.read_bytes())
    index = trio.run(load_layer_index, MemoryBlob(bytes(data)))
    entry = index.lookup(0, b"busybox")
    assert entry is not None and index.attr(entry).kind == EntryKind.REG
    target = index.chunks(entry)[3]
    data[(target.blob_offset + target.blob_end) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    original = Path("/bin/busybox").read_bytes()
    mnt = tmp_path / "mnt"
    with running_mount(lazysnap_mount_args(blob, mnt, "--no-background-fetch"), mnt) as server:
        fd = os.open(mnt / "busybox", os.O_RDONLY)
        try:
            assert os.pread(fd, CHUNK, 0) == original[:CHUNK]  # an intact chunk
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, target.file_offset + 10)
            assert info.value.errno == errno.EIO
            with pytest.raises(OSError) as again:  # every time: nothing wrong gets cached
                os.pread(fd, 4096, target.file_offset)
            assert again.value.errno == errno.EIO
        finally:
            os.close(fd)
        with pytest.raises(OSError) as whole:
            (mnt / "busybox").read_bytes()
        assert whole.value.errno == errno.EIO
        assert (mnt / "etc/hostname").read_bytes() == b"lazysnap\n"  # the rest still works
    assert server.proc.returncode == 0
    errors = server.output()
    assert "chunk rejected" in errors and "busybox" in errors


def upper_layer_tar(root: Path) -> bytes:
    """A second layer: deletes ``empty`` (whiteout), makes ``etc`` opaque, adds a file."""
    (root / "etc").mkdir(parents=True)
    (root / ".wh.empty").write_bytes(b"")
    (root / "etc" / ".wh..wh..opq").write_bytes(b"")
    (root / "etc" / "motd").write_bytes(b"from the upper layer\n")
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    return gnu_tar(root)


def test_overlayfs_over_lazysnap_mounts_matches_the_merged_tars(
    layer: tuple[bytes, dict[str, Seen]], tmp_path: Path
) -> None:
    lower_tar, lower_view = layer
    lower_blob = write_blob(lower_tar, "zstd", tmp_path / "lower.blob")
    upper_blob = write_blob(
        upper_layer_tar(tmp_path / "upper-tree"), "estargz", tmp_path / "upper.blob"
    )
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    merged, rw, work = tmp_path / "merged", tmp_path / "rw", tmp_path / "work"
    for d in (merged, rw, work):
        d.mkdir()
    with (
        running_mount(lazysnap_mount_args(lower_blob, lower), lower),
        running_mount(lazysnap_mount_args(upper_blob, upper), upper),
    ):
        options = f"lowerdir={upper}:{lower},upperdir={rw},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        try:
            seen = normalise_groups(view(merged, from_tar=False))
        finally:
            subprocess.run(["umount", str(merged)], check=True, timeout=30)
    expected = {
        p: s
        for p, s in lower_view.items()
        if p != "empty" and not p.startswith("etc/") and not (stat.S_ISCHR(s.mode) and not s.rdev)
    }
    # The upper layer's etc/motd only; the lower etc/hostname is hidden by the opaque dir.
    assert sorted(seen) == sorted([*expected, "etc/motd"])
    for path, want in expected.items():
        got = seen[path]
        if path == "etc":
            # the directory now comes from the upper layer (overlayfs hides trusted.overlay.*)
            assert stat.S_ISDIR(got.mode) and got.xattrs == ()
            continue
        assert (
            got.mode,
            got.uid,
            got.gid,
            got.size,
            got.mtime_ns,
            got.rdev,
            got.target,
            got.xattrs,
            got.content_sha,
        ) == (
            want.mode,
            want.uid,
            want.gid,
            want.size,
            want.mtime_ns,
            want.rdev,
            want.target,
            tuple(x for x in want.xattrs if not x[0].startswith("trusted.overlay.")),
            want.content_sha,
        ), path
    assert (merged.parent / "rw").exists()


def test_concurrent_cold_readers_get_the_right_bytes(
    layer: tuple[bytes, dict[str, Seen]], tmp_path: Path
) -> None:
    tar_bytes, expected = layer
    blob = write_blob(tar_bytes, "estargz", tmp_path / "layer.blob")
    files = sorted(p for p, s in expected.items() if stat.S_ISREG(s.mode) and s.size)
    mnt = tmp_path / "mnt"
    errors: list[str] = []

    def reader(offset: int) -> None:
        # Every thread reads every file, starting at a different one, in odd-sized pieces.
        for path in files[offset:] + files[:offset]:
            digest = hashlib.sha256()
            with open(mnt / path, "rb", buffering=0) as f:
                while piece := f.read(12_345 + offset):
                    digest.update(piece)
            if digest.hexdigest() != expected[path].content_sha:
                errors.append(path)

    with running_mount(lazysnap_mount_args(blob, mnt, "--no-background-fetch"), mnt):
        threads = [threading.Thread(target=reader, args=(i * 7,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
    assert errors == []
