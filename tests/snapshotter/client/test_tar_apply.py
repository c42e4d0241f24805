"""The direct applier against containerd's apply semantics: whiteouts for overlayfs and for a
bottom layer, replacement and merging, hard links, ownership, modes, xattrs, times, and the
paths it leaves to containerd."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

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
