"""The direct applier against containerd's apply semantics: whiteouts for overlayfs and for a
bottom layer, replacement and merging, hard links, ownership, modes, xattrs, times, and the
paths it leaves to containerd."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import cast

import pytest

from snapshotter.client.tar_apply import (
    OPAQUE_XATTR,
    BadLayerError,
    UnsupportedEntryError,
    apply_tar,
)

# vfs_cap_data revision 2 granting CAP_NET_BIND_SERVICE, as setcap writes it.
CAPABILITY = b"\x01\x00\x00\x02" + b"\x00\x04\x00\x00" + bytes(12)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod, chown and trusted.* need root")


class Tar:
    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object
            ) -> Tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
        info.mtime = 1_600_000_000
        for key, value in attrs.items():
            setattr(info, key, value)
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
        else:
            self._tar.addfile(info)
        return self

    def stream(self) -> io.BytesIO:
        self._tar.close()
        return io.BytesIO(self._buffer.getvalue())


def test_files_directories_symlinks_and_hard_links(tmp_path: Path) -> None:
    tar = (Tar().add("etc", tarfile.DIRTYPE, mtime=1_500_000_000)
           .add("etc/passwd", data=b"root\n", mode=0o4755)
           .add("etc/link", tarfile.SYMTYPE, linkname="passwd")
           .add("etc/hard", tarfile.LNKTYPE, linkname="etc/passwd", mode=0o4755)
           .add("./usr/../bin/sh", data=b"#!"))
    assert apply_tar(tar.stream(), tmp_path, overlay=False) == 5
    passwd = tmp_path / "etc/passwd"
    assert passwd.read_bytes() == b"root\n"
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o4755  # set-user-ID survives the chown
    assert os.readlink(tmp_path / "etc/link") == "passwd"
    assert (tmp_path / "etc/hard").stat().st_ino == passwd.stat().st_ino
    assert (tmp_path / "bin/sh").read_bytes() == b"#!"  # cleaned, never outside the root
    assert (tmp_path / "etc").stat().st_mtime == 1_500_000_000  # directory times go last
    assert passwd.stat().st_mtime == 1_600_000_000


def test_nothing_escapes_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    apply_tar(Tar().add("../../outside", data=b"x").stream(), root, overlay=False)
    assert (root / "outside").read_bytes() == b"x"
    assert not (tmp_path / "outside").exists()


@needs_root
def test_ownership_and_xattrs(tmp_path: Path) -> None:
    tar = Tar().add("f", data=b"x", uid=1234, gid=5678,
                    pax_headers={"SCHILY.xattr.user.note": "hello",
                                 "SCHILY.xattr.security.capability": CAPABILITY.decode()})
    apply_tar(tar.stream(), tmp_path, overlay=False)
    info = (tmp_path / "f").stat()
    assert (info.st_uid, info.st_gid) == (1234, 5678)
    assert os.getxattr(tmp_path / "f", "user.note") == b"hello"
    assert os.getxattr(tmp_path / "f", "security.capability") == CAPABILITY


@needs_root
def test_overlay_whiteouts(tmp_path: Path) -> None:
    tar = (Tar().add("gone/.wh..wh..opq").add("etc/.wh.removed", uid=7, gid=8))
    apply_tar(tar.stream(), tmp_path, overlay=True)
    removed = (tmp_path / "etc/removed").lstat()
    assert stat.S_ISCHR(removed.st_mode) and removed.st_rdev == 0
    assert (removed.st_uid, removed.st_gid) == (7, 8)
    assert os.getxattr(tmp_path / "gone", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(tmp_path / "etc")) == ["removed"]  # no .wh. file itself


def test_whiteouts_on_a_bottom_layer_remove(tmp_path: Path) -> None:
    tar = (Tar().add("d/old", data=b"1").add("d/keep", data=b"2").add("d/.wh.old")
           .add("e/x", data=b"3").add("e/.wh..wh..opq").add("e/y", data=b"4"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e/stale").write_bytes(b"from before")
    apply_tar(tar.stream(), tmp_path, overlay=False)
    assert sorted(os.listdir(tmp_path / "d")) == ["keep"]
    assert sorted(os.listdir(tmp_path / "e")) == ["x", "y"]


def test_entries_replace_what_is_there_but_directories_merge(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/kept").write_bytes(b"k")
    (tmp_path / "was-dir").mkdir()
    (tmp_path / "was-dir/inner").write_bytes(b"i")
    (tmp_path / "was-file").write_bytes(b"f")
    tar = (Tar().add("dir", tarfile.DIRTYPE, mode=0o700).add("was-dir", data=b"now a file")
           .add("was-file", tarfile.DIRTYPE))
    apply_tar(tar.stream(), tmp_path, overlay=False)
    assert (tmp_path / "dir/kept").read_bytes() == b"k"
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o700
    assert (tmp_path / "was-dir").read_bytes() == b"now a file"
    assert (tmp_path / "was-file").is_dir()


@needs_root
def test_a_missing_parent_takes_the_lower_layers_attributes(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "srv").mkdir(parents=True)
    os.chmod(lower / "srv", 0o750)
    os.chown(lower / "srv", 42, 43)
    upper.mkdir()
    apply_tar(Tar().add("srv/new", data=b"n").add("opt/new", data=b"o").stream(), upper,
              overlay=True, lowers=[lower])
    srv = (upper / "srv").stat()
    assert (stat.S_IMODE(srv.st_mode), srv.st_uid, srv.st_gid) == (0o750, 42, 43)
    assert stat.S_IMODE((upper / "opt").stat().st_mode) == 0o755


def test_a_path_through_a_symbolic_link_is_left_to_containerd(tmp_path: Path) -> None:
    tar = Tar().add("lib", tarfile.SYMTYPE, linkname="/etc").add("lib/evil", data=b"x")
    with pytest.raises(UnsupportedEntryError):
        apply_tar(tar.stream(), tmp_path, overlay=False)
    assert not Path("/etc/evil").exists()


def test_a_file_used_as_a_directory_is_a_bad_layer(tmp_path: Path) -> None:
    with pytest.raises(BadLayerError):
        apply_tar(Tar().add("f", data=b"x").add("f/g", data=b"y").stream(), tmp_path,
                  overlay=False)


def test_a_hard_link_to_a_symbolic_link_is_not_followed_by_chmod(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    os.chmod(outside, 0o600)
    root = tmp_path / "root"
    root.mkdir()
    tar = (Tar().add("s", tarfile.SYMTYPE, linkname=str(outside))
           .add("h", tarfile.LNKTYPE, linkname="s", mode=0o777))
    apply_tar(tar.stream(), root, overlay=False)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert os.readlink(root / "h") == str(outside)


@pytest.mark.parametrize("fresh", [True, False], ids=["empty-root", "used-root"])
def test_a_hard_link_to_a_symbolic_link_on_an_entry_path_is_left_to_containerd(
    tmp_path: Path, fresh: bool
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if not fresh:
        (root / "unrelated").write_bytes(b"u")
    escape = tmp_path / "escape"
    escape.mkdir()
    tar = (Tar().add("s", tarfile.SYMTYPE, linkname=str(escape))
           .add("h", tarfile.LNKTYPE, linkname="s").add("h/evil", data=b"x"))
    with pytest.raises(UnsupportedEntryError):
        apply_tar(tar.stream(), root, overlay=False)
    assert not (escape / "evil").exists()


class _Counted:
    """Counts the calls of an ``os`` function whose first argument is a path (not an fd)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.paths: list[str] = []
        original = getattr(os, name)

        def counted(target: object, *args: object, **kwargs: object) -> object:
            if not isinstance(target, int):
                self.paths.append(os.fspath(cast(str, target)))
            return original(target, *args, **kwargs)

        monkeypatch.setattr(os, name, counted)


def test_an_empty_root_is_not_asked_what_is_at_each_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = (Tar().add("etc", tarfile.DIRTYPE).add("etc/a", data=b"a").add("etc/b", data=b"b")
           .add("usr/bin/x", data=b"x").add("etc/a", data=b"again"))
    lstat = _Counted(monkeypatch, "lstat")
    apply_tar(tar.stream(), tmp_path, overlay=False)
    # Only the replaced etc/a is looked at (to remove it); before, every entry and parent was.
    assert lstat.paths == [str(tmp_path / "etc/a")]
    assert (tmp_path / "etc/a").read_bytes() == b"again"


def test_regular_files_get_their_metadata_through_the_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = b"b" * (2 * 1024 * 1024)  # written by the reading thread rather than a writer
    tar = Tar().add("small", data=b"s", mode=0o751).add("big", data=big, mode=0o640)
    by_path = [_Counted(monkeypatch, name) for name in ("chmod", "lchown", "chown", "utime")]
    apply_tar(tar.stream(), tmp_path, overlay=False)
    assert [counted.paths for counted in by_path] == [[], [], [], []]
    assert stat.S_IMODE((tmp_path / "small").stat().st_mode) == 0o751
    assert stat.S_IMODE((tmp_path / "big").stat().st_mode) == 0o640
    assert (tmp_path / "big").stat().st_mtime == 1_600_000_000
    assert (tmp_path / "big").read_bytes() == big


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What a tree holds: type, mode, owner, times of non-directories, contents, link targets."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        detail: object = None
        if stat.S_ISLNK(info.st_mode):
            detail = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            detail = path.read_bytes()
        found[str(path.relative_to(root))] = (
            stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid,
            info.st_mtime_ns if not stat.S_ISDIR(info.st_mode) else None, detail)
    return found


# Layers whose entries replace or remove what earlier entries of the same layer created.
REWRITING_LAYERS = {
    "file-dir-file": lambda: (
        Tar().add("x", data=b"1").add("x", tarfile.DIRTYPE).add("x/y", data=b"2")
        .add("x", data=b"3")),
    "directories-merge": lambda: (
        Tar().add("d", tarfile.DIRTYPE, mode=0o700).add("d/a", data=b"a")
        .add("d", tarfile.DIRTYPE, mode=0o750).add("d/b", data=b"b")),
    "whiteout-then-again": lambda: (
        Tar().add("w/sub", tarfile.DIRTYPE).add("w/sub/old", data=b"o").add(".wh.w")
        .add("w/sub/new", data=b"n")),
    "opaque-keeps-this-layer": lambda: (
        Tar().add("o/deep/f", data=b"f").add("o/.wh..wh..opq").add("o/g", data=b"g")),
    "symlink-replaced-by-directory": lambda: (
        Tar().add("l", tarfile.SYMTYPE, linkname="/etc").add("l", tarfile.DIRTYPE)
        .add("l/inside", data=b"i")),
    "hard-links": lambda: (
        Tar().add("t", data=b"t", mode=0o4755).add("h", tarfile.LNKTYPE, linkname="t")
        .add("t", data=b"new t")),
}


@pytest.mark.parametrize("layer", sorted(REWRITING_LAYERS))
def test_an_empty_root_ends_as_a_used_root_does(tmp_path: Path, layer: str) -> None:
    """The tracked view of an empty root gives the tree that asking the file system gives."""
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    (used / "unrelated").mkdir(parents=True)  # not empty: every path is looked up
    apply_tar(REWRITING_LAYERS[layer]().stream(), empty, overlay=False)
    apply_tar(REWRITING_LAYERS[layer]().stream(), used, overlay=False)
    expected = _tree(used)
    del expected["unrelated"]
    assert _tree(empty) == expected
    assert expected  # the layer left something to compare


def test_a_tar_cut_inside_a_files_data_fails(tmp_path: Path) -> None:
    whole = Tar().add("big", data=b"x" * 3000).add("next", data=b"n").stream().getvalue()
    with pytest.raises((BadLayerError, tarfile.ReadError)):
        apply_tar(io.BytesIO(whole[:2048]), tmp_path, overlay=False)


def test_the_layers_stream_is_read_in_large_pieces_not_per_header(tmp_path: Path) -> None:
    tar = Tar()
    for number in range(300):
        tar.add(f"f{number}", data=b"d" * 100)
    stream = tar.stream()
    reads = 0
    original = stream.read

    def counted(size: int = -1, /) -> bytes:
        nonlocal reads
        reads += 1
        return original(size)

    stream.read = counted  # type: ignore[method-assign]
    assert apply_tar(stream, tmp_path, overlay=False) == 300
    # 300 KiB of tar: tarfile's stream mode read it 10 KiB at a time.
    assert reads <= 3
    assert (tmp_path / "f299").read_bytes() == b"d" * 100


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse tars")
@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_sparse_files_are_filled_in(tmp_path: Path, tar_format: str) -> None:
    """GNU sparse members (old GNU headers and PAX 1.0) go through tarfile's reader, which
    seeks within the member: it must do so forwards only."""
    source = tmp_path / "src"
    source.mkdir()
    with (source / "sparse").open("wb") as out:
        out.seek(1 << 20)
        out.write(b"middle")
        out.seek(3 << 20)
        out.write(b"end")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-cf", str(archive), "-C",
                    str(source), "sparse"], check=True)
    with tarfile.open(archive) as tar:
        assert tar.getmembers()[0].sparse is not None  # really a sparse member
    root = tmp_path / "root"
    root.mkdir()
    apply_tar(io.BytesIO(archive.read_bytes()), root, overlay=False)
    assert (root / "sparse").read_bytes() == (source / "sparse").read_bytes()
