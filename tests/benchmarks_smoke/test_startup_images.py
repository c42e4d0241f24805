"""benchmarks/startup.py's two-layer image, ctr-remote and CRI arms, the parts that run without
root: the python/base split, the re-tagged ctr-remote export, the CRI log reader and the arm
tables."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.benchmarks_smoke.test_startup_stargz import startup

# Loading startup.py put benchmarks/ on sys.path and imported its helper modules.
image_variants = sys.modules["image_variants"]
cri_start = sys.modules["cri_start"]


def _tar(path: Path, members: list[tuple[str, bytes | str | None]]) -> None:
    """Regular files (bytes), directories (None) and hard links ("link:target")."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.LNKTYPE
                info.linkname = content.removeprefix("link:")
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def _members(path: Path) -> list[tuple[str, bytes | str | None]]:
    out: list[tuple[str, bytes | str | None]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            if info.isdir():
                out.append((info.name, None))
            elif info.islnk():
                out.append((info.name, "link:" + info.linkname))
            else:
                data = tar.extractfile(info)
                assert data is not None
                out.append((info.name, data.read()))
    return out


def test_split_python_puts_python_in_the_second_layer_in_order(tmp_path: Path) -> None:
    rootfs = [
        ("./usr", None),
        ("./usr/bin", None),
        ("./usr/bin/python3.11", b"interpreter"),
        ("./usr/bin/python3", "link:./usr/bin/python3.11"),  # follows its target
        ("./usr/bin/sh", b"shell"),
        ("./usr/bin/pythonic", b"not python3"),
        ("./usr/lib", None),
        ("./usr/lib/python3.11", None),
        ("./usr/lib/python3.11/json.py", b"json"),
        ("./usr/lib/python3", None),
        ("./usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", b"lib"),
        ("./usr/lib/x86_64-linux-gnu/libc.so.6", b"libc"),
        ("./usr/share/python3/debpython/option.py", b"helper"),
        ("./etc/python3.11-not-moved", b"config"),
    ]
    _tar(tmp_path / "rootfs.tar", rootfs)
    counts = image_variants.split_python(
        tmp_path / "rootfs.tar", tmp_path / "base.tar", tmp_path / "python.tar")
    python_names = {"./usr/bin/python3.11", "./usr/bin/python3", "./usr/lib/python3.11",
                    "./usr/lib/python3.11/json.py", "./usr/lib/python3",
                    "./usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
                    "./usr/share/python3/debpython/option.py"}
    assert _members(tmp_path / "python.tar") == [m for m in rootfs if m[0] in python_names]
    assert _members(tmp_path / "base.tar") == [m for m in rootfs if m[0] not in python_names]
    assert counts == (len(rootfs) - len(python_names), len(python_names))


def test_a_hard_link_to_a_base_file_stays_in_the_base_layer(tmp_path: Path) -> None:
    _tar(tmp_path / "rootfs.tar", [("./usr/bin/real", b"x"),
                                   ("./usr/bin/python3-alias", "link:./usr/bin/real")])
    image_variants.split_python(
        tmp_path / "rootfs.tar", tmp_path / "base.tar", tmp_path / "python.tar")
    assert [name for name, _ in _members(tmp_path / "base.tar")] == [
        "./usr/bin/real", "./usr/bin/python3-alias"]
    assert _members(tmp_path / "python.tar") == []


def test_the_ctr_export_is_retagged_latest(tmp_path: Path) -> None:
    manifest = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + "ab" * 32, "size": 10,
                "annotations": {"io.containerd.image.name": "docker.io/bench/converted:latest",
                                "org.opencontainers.image.ref.name": "converted"}}
    (tmp_path / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                     "manifests": [manifest]}))
    image_variants._retag_latest(tmp_path)
    [only] = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert only["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    assert only["digest"] == manifest["digest"]

    (tmp_path / "index.json").write_text(json.dumps({"manifests": [manifest, manifest]}))
    with pytest.raises(RuntimeError, match="one image manifest"):
        image_variants._retag_latest(tmp_path)


def test_first_log_line_reads_the_message_of_a_cri_log(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    with pytest.raises(TimeoutError):
        cri_start.first_log_line(log, time.monotonic() + 0.05)
    log.write_text("2026-12-03T23:00:00.1Z stdout F hello there\n"
                   "2026-12-03T23:00:00.2Z stdout F second\n")
    assert cri_start.first_log_line(log, time.monotonic() + 1) == "hello there"
    log.write_text("2026-12-03T23:00:00.1Z stdout F hel")  # not a whole line yet
    with pytest.raises(TimeoutError):
        cri_start.first_log_line(log, time.monotonic() + 0.05)


def test_arm_tables_cover_every_arm_and_keep_the_defaults() -> None:
    assert startup.DEFAULT_ARMS == ("overlayfs", "estargz", "zstd:chunked")
    for arm in startup.ARMS:
        assert arm in startup.ARM_TITLES and len(startup.ARM_TITLES[arm]) <= 23
        assert startup.LAYOUT_KIND[arm] in startup.LAYOUT_DIRS
    # Each stargz-snapshotter arm pulls the very blobs of a lazysnap arm.
    assert startup.TAGS["stargz-ctr-remote"] == startup.TAGS["ctr-remote"] != \
        startup.TAGS["estargz"]
    assert startup.TAGS["cri-stargz"] == startup.TAGS["cri-estargz"] == startup.TAGS["estargz"]
    assert startup.SNAPSHOTTER["cri-overlayfs"] == "overlayfs"
    assert startup.SNAPSHOTTER["cri-ctr-remote"] == "lazysnap"
    assert startup.SNAPSHOTTER["cri-stargz-ctr-remote"] == "stargz"
    assert set(startup.CRI_ARMS) == {a for a in startup.ARMS if a.startswith("cri-")}


def test_cri_arms_are_compared_with_the_cri_full_pull() -> None:
    link = startup.Link("loopback", 0, 0)
    rows = [startup.Result("loopback", "hello", "overlayfs", ok=True, first_output_s=10.0),
            startup.Result("loopback", "hello", "cri-overlayfs", ok=True, first_output_s=20.0),
            startup.Result("loopback", "hello", "cri-estargz", ok=True, first_output_s=2.0)]
    info = startup.ImageInfo("overlayfs", Path("/nowhere"), (1,), 1)
    table = startup.render(link, rows, {"overlayfs": info}).splitlines()
    [cri_row] = [line for line in table if line.startswith("hello") and "CRI lazysnap" in line]
    assert " 0.10x " in cri_row  # 2 s vs CRI overlayfs' 20 s, not vs overlayfs' 10 s


def _tar_at(path: Path, members: list[tuple[str, bytes | None, int]]) -> None:
    """Regular files (bytes) and directories (None), each with its mtime."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, mtime in members:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def test_the_gcc_split_puts_what_the_install_changed_in_the_second_layer(
        tmp_path: Path) -> None:
    before = [("./", None, 1), ("./etc", None, 1), ("./etc/os-release", b"bookworm", 1),
              ("./var", None, 1), ("./var/lib", None, 1), ("./var/lib/status", b"old", 1),
              ("./usr", None, 1), ("./usr/bin", None, 1), ("./usr/bin/sh", b"shell", 1),
              ("./usr/bin/gone", b"removed by the install", 1)]
    after = [("./", None, 1), ("./etc", None, 1), ("./etc/os-release", b"bookworm", 1),
             ("./var", None, 1), ("./var/lib", None, 1),
             ("./var/lib/status", b"new", 1),  # same mtime and size, other bytes
             ("./usr", None, 1), ("./usr/bin", None, 2), ("./usr/bin/sh", b"shell", 1),
             ("./usr/bin/gcc", b"compiler", 2),
             ("./usr/lib", None, 2), ("./usr/lib/gcc", None, 2), ("./usr/lib/gcc/cc1", b"x", 2)]
    _tar_at(tmp_path / "before.tar", before)
    _tar_at(tmp_path / "after.tar", after)
    changed = image_variants.changed_members(tmp_path / "before.tar", tmp_path / "after.tar")
    # var and var/lib did not change themselves: they are there as the parents of status.
    assert changed == {"var", "var/lib", "var/lib/status", "usr", "usr/bin", "usr/bin/gcc",
                       "usr/lib", "usr/lib/gcc", "usr/lib/gcc/cc1"}
    counts = image_variants.split_changed(tmp_path / "after.tar", changed,
                                          tmp_path / "base.tar", tmp_path / "gcc.tar")
    assert [name for name, _ in _members(tmp_path / "base.tar")] == [
        ".", "./etc", "./etc/os-release", "./usr/bin/sh"]
    assert [name for name, _ in _members(tmp_path / "gcc.tar")] == [
        "./var", "./var/lib", "./var/lib/status", "./usr", "./usr/bin", "./usr/bin/gcc",
        "./usr/lib", "./usr/lib/gcc", "./usr/lib/gcc/cc1"]
    assert counts == (4, 9)


def test_workloads_default_to_those_the_image_runs_and_refuse_the_others() -> None:
    assert startup.choose_workloads(None, "one-layer") == ["hello", "imports", "read-everything"]
    assert startup.choose_workloads(None, "gcc") == ["read-everything", "gcc"]
    assert startup.choose_workloads("gcc, read-everything", "gcc") == ["gcc", "read-everything"]
    with pytest.raises(SystemExit, match="'gcc' does not run on the two-layer image; use "
                       "--image gcc"):
        startup.choose_workloads("hello,gcc", "two-layer")
    with pytest.raises(SystemExit, match="'hello' does not run on the gcc image"):
        startup.choose_workloads("hello", "gcc")
    with pytest.raises(SystemExit, match="unknown workload 'cc'"):
        startup.choose_workloads("cc", "gcc")


def test_the_gcc_workload_compiles_a_program_that_prints_first() -> None:
    shell, flag, script = startup.WORKLOADS["gcc"]
    assert (shell, flag) == ("sh", "-c")
    assert "gcc -o /tmp/hello /tmp/hello.c && /tmp/hello" in script
    assert 'puts(\"compiled hello\")' in script


def test_the_table_has_no_issue_5_target_for_gcc_and_compares_with_stargz() -> None:
    link = startup.Link("limited", 100, 20)
    rows = [startup.Result("limited", "gcc", "overlayfs", ok=True, first_output_s=17.0),
            startup.Result("limited", "gcc", "estargz", ok=True, first_output_s=2.6),
            startup.Result("limited", "gcc", "stargz", ok=True, first_output_s=4.0),
            startup.Result("limited", "gcc", "ctr-remote", ok=True, first_output_s=3.0),
            startup.Result("limited", "gcc", "stargz-ctr-remote", ok=True, first_output_s=4.0)]
    info = startup.ImageInfo("overlayfs", Path("/nowhere"), (1,), 1)
    table = startup.render(link, rows, {"overlayfs": info}).splitlines()
    [estargz_row] = [line for line in table if line.startswith("gcc ") and "lazysnap eStargz"
                     in line]
    # vs the full pull: a ratio, but no issue 5 target (only whole-image-local has one).
    assert " 0.15x " in estargz_row and "<=0." not in estargz_row
    assert ("gcc: lazysnap / stargz-snapshotter, first out (target <=0.65x): "
            "lazysnap eStargz 0.65x ok, lazysnap ctr-remote 0.75x MISS") in table


def test_container_names_differ_between_runs_of_the_script() -> None:
    # runc's state directory is shared by every containerd of the machine.
    assert startup.container_id(3) == f"bench{os.getpid()}-3"
    assert startup.container_id(3) != startup.container_id(4)


def test_the_profile_arm_pulls_the_estargz_blobs_from_a_repository_per_workload() -> None:
    """Referrers belong to a repository: no other arm, and no other workload, may find the
    profile a recording run published."""
    assert startup.LAYOUT_KIND["estargz+profile"] == "estargz"
    assert startup.STARGZ_COUNTERPART["estargz+profile"] == "stargz"
    names = {startup.repository(arm, workload) for arm in ("estargz", "stargz")
             for workload in ("hello", "imports")}
    assert names == {startup.REPOSITORY}
    assert startup.repository("estargz+profile", "hello") != \
        startup.repository("estargz+profile", "imports") != startup.REPOSITORY
