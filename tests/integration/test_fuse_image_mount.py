"""``lazysnap mount IMAGE MOUNTPOINT``: an image's seekable layers from a real registry, merged
read-only with overlayfs over one FUSE mount; a plain gzip layer is refused clearly."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.fuse_support import LAZYSNAP, is_mounted, running_mount, wait_for
from tests.support import oci_image as oci
from tests.support.docker_registry import RunningRegistry

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.registry]


def lazysnap_mounts() -> list[str]:
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [line.split()[1] for line in f if "lazysnap-mount-" in line.split()[1]]


def push(registry: RunningRegistry, tmp_path: Path, name: str, layers: list[oci.Layer]) -> str:
    layout = tmp_path / f"layout-{name}"
    oci.write_layout(layout, layers)
    reference = f"{registry.host}/test/{name}:v1"
    oci.push_layout(layout, "latest", reference)
    return reference


def mount_args(reference: str, mnt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        str(LAZYSNAP),
        "mount",
        reference,
        str(mnt),
        "--hosts-dir",
        str(tmp_path / "hosts"),
        *extra,
    ]


def test_image_layers_are_merged_read_only(
    docker_registry: RunningRegistry, tmp_path: Path
) -> None:
    base = oci.TarBuilder().dir("etc").file("etc/os", b"base\n").file("etc/gone", b"x\n")
    base = base.dir("app").file("app/old", b"old\n").file("big", os.urandom(300_000))
    top = oci.TarBuilder().whiteout("etc/gone").dir("app").file("app/.wh..wh..opq", b"")
    top = top.file("app/new", b"new\n")
    reference = push(
        docker_registry,
        tmp_path,
        "merged",
        [
            oci.seekable_layer(base.tar(), "estargz", chunk_size=65536),
            oci.seekable_layer(top.tar(), "zstd"),
        ],
    )
    mnt = tmp_path / "mnt"
    before = set(lazysnap_mounts())
    with running_mount(mount_args(reference, mnt, tmp_path), mnt) as server:
        assert sorted(os.listdir(mnt)) == ["app", "big", "etc"]
        assert sorted(os.listdir(mnt / "etc")) == ["os"]  # whited out by the top layer
        assert os.listdir(mnt / "app") == ["new"]  # opaque directory
        assert (mnt / "etc/os").read_bytes() == b"base\n"
        assert len((mnt / "big").read_bytes()) == 300_000
        with pytest.raises(OSError) as info:
            (mnt / "etc/os").write_bytes(b"changed")
        assert info.value.errno == errno.EROFS
        assert len(set(lazysnap_mounts()) - before) == 1  # the private FUSE mount
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
    assert server.proc.returncode == 0, server.output()
    assert not is_mounted(mnt)
    assert set(lazysnap_mounts()) == before


def test_external_umount_stops_the_command(
    docker_registry: RunningRegistry, tmp_path: Path
) -> None:
    layers = [
        oci.seekable_layer(oci.TarBuilder().file(f"f{i}", b"%d\n" % i).tar(), "estargz")
        for i in range(2)
    ]
    reference = push(docker_registry, tmp_path, "umount", layers)
    mnt = tmp_path / "mnt"
    with running_mount(mount_args(reference, mnt, tmp_path), mnt) as server:
        assert sorted(os.listdir(mnt)) == ["f0", "f1"]
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        wait_for(lambda: server.proc.poll() is not None, 30, "the command to exit")
    assert server.proc.returncode == 0, server.output()


def test_a_plain_gzip_layer_is_refused(docker_registry: RunningRegistry, tmp_path: Path) -> None:
    reference = push(
        docker_registry, tmp_path, "plain", [oci.gzip_layer(oci.TarBuilder().file("a", b"a").tar())]
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(mount_args(reference, mnt, tmp_path), capture_output=True, timeout=60)
    assert run.returncode == 1
    assert b"cannot be mounted lazily" in run.stderr
    assert not is_mounted(mnt)
