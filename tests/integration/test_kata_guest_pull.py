"""Kata guest-pull mode with real parts: Debian's containerd 1.6 + runc, the docker-registry on
loopback, the lazysnap daemon with ``--kata-guest-pull`` and its mount helper.

There is no VM here: a runc container stands for the host's side of a Kata pod. containerd
mounts the container's one ``fuse.…nydus-overlayfs-lazysnap`` mount through ``mount.fuse`` and
the helper, resolves a named user from the lazily served ``/etc/passwd`` and runs the container;
the same mount, as containerd hands it to a runtime, passes Kata's parser and type check
(ported in tests/snapshotter/store/kata_rules.py). The registry's access log tells what the host
fetched. One daemon, containerd and image serve the whole module (CI time).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.client.chain import chain_ids
from snapshotter.labels import KATA_GUEST_PULL
from snapshotter.store.guest_pull import VOLUME_OPTION
from tests.integration.test_lazy_end_to_end import (
    _layer_bytes_served,
    _pull,
    _snapshot_labels,
    _wait_until_containerd_reconnects,
)
from tests.snapshotter.store.kata_rules import is_nydus_rootfs_type, kata_accepts
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.containerd,
    pytest.mark.registry,
    pytest.mark.slow,
]

PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:2345:\n"
SEED = b"copied from the image into the volume\n"
FILLER_FILES = 4
FILLER_BYTES = 1 << 20  # each; random, so compression cannot shrink what a read would fetch
FETCHED_LIMIT = 0.5  # a named-user `true` may need at most this share of the image


@dataclass(frozen=True)
class KataImage:
    reference: str
    layers: tuple[oci.Layer, ...]
    filler: tuple[bytes, ...]

    @property
    def compressed_size(self) -> int:
        return sum(len(layer.blob) for layer in self.layers)

    @property
    def digests(self) -> list[str]:
        return [oci.sha256(layer.blob) for layer in self.layers]

    @property
    def top(self) -> str:
        return chain_ids([layer.diff_id for layer in self.layers])[-1]


@pytest.fixture(scope="module")
def kata_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> KataImage:
    """busybox with a named USER and a VOLUME /data holding a file, then 4 MiB of filler.

    The user is the image's USER: ctr 1.6 has no --user flag, and resolves the image's USER
    on the host the way ``ctr run --user`` does in later versions (oci.WithUser: a temporary
    mount of the container's snapshot, then /etc/passwd and /etc/group read from it)."""
    base = oci.TarBuilder().dir("bin").dir("etc").dir("tmp", 0o1777).dir("data")
    base.file("bin/busybox", oci.BUSYBOX.read_bytes(), 0o755)
    for applet in oci.BUSYBOX_APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.file("etc/passwd", PASSWD).file("etc/group", GROUP).file("data/seed", SEED)
    rng = random.Random(11)
    filler = tuple(rng.randbytes(FILLER_BYTES) for _ in range(FILLER_FILES))
    second = oci.TarBuilder().dir("opt")
    for i, data in enumerate(filler):
        second.file(f"opt/filler{i}", data)
    layers = (oci.seekable_layer(base.tar(), "estargz"),
              oci.seekable_layer(second.tar(), "estargz"))
    layout = tmp_path_factory.mktemp("kata-layout")
    oci.write_layout(layout, layers, volumes=["/data"], user="app")
    reference = f"{docker_registry.host}/kata/app:1"
    oci.push_layout(layout, "latest", reference)
    return KataImage(reference, layers, filler)


@dataclass
class Stack:
    daemon: Daemon
    containerd: RunningContainerd
    pull_served: int  # layer bytes the registry served for the pull itself


@pytest.fixture(scope="module")
def stack(docker_registry: RunningRegistry, kata_image: KataImage) -> Iterator[Stack]:
    """lazysnap in guest-pull mode without background fetch (the registry serves only what the
    host reads), containerd 1.6 using it, and the image pulled lazily."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    work = Path(tempfile.mkdtemp(prefix="lk", dir="/tmp"))
    config = work / "lazysnap.toml"
    config.write_text("[lazy]\nbackground_fetch = false\n")
    try:
        with running_daemon(work / "d", extra_args=["--config", str(config),
                                                   "--kata-guest-pull"]) as daemon, \
                run_containerd(work / "c", daemon.address) as containerd:
            start = len(docker_registry.log())
            pulled = _pull(containerd, kata_image.reference)
            outcomes = [line.split()[3] for line in pulled.splitlines()
                        if line.startswith("layer ")]
            assert outcomes == ["remote"] * len(kata_image.layers), pulled
            served, _ = _layer_bytes_served(docker_registry.log()[start:], kata_image.digests)
            yield Stack(daemon, containerd, served)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mount_of(containerd: RunningContainerd, key: str) -> tuple[str, str, list[str]]:
    """(type, source, options) of a snapshot's one mount as containerd hands it out; ctr
    prints it as a mount(8) command line."""
    line = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "mounts", "/x", key).stdout
    (command,) = line.strip().splitlines()
    words = shlex.split(command)
    assert words[:2] == ["mount", "-t"], command
    assert words[4] == "/x" and words[5] == "-o", command
    return words[2], words[3], words[6].split(",")


def _assert_kata_would_pull_in_guest(
    mount: tuple[str, str, list[str]], reference: str
) -> None:
    mount_type, source, options = mount
    assert is_nydus_rootfs_type(mount_type), mount_type
    assert source == "overlay"
    assert {o.split("=", 1)[0] for o in options} >= {"lowerdir", "upperdir", "workdir"}
    (volume,) = [o[len(VOLUME_OPTION):] for o in options if o.startswith(VOLUME_OPTION)]
    assert kata_accepts(volume)["source"] == reference


def test_image_volume_contents_copy_through_the_helper(
    stack: Stack, docker_registry: RunningRegistry, kata_image: KataImage, tmp_path: Path
) -> None:
    """What containerd's CRI does on the host for a Kata pod's container: mount its rootfs in
    a temporary directory, copy the image VOLUME's contents out (WithVolumes) and read
    /etc/passwd and /etc/group (WithUser, WithAdditionalGIDs). The CRI plugin is off in these
    tests and there is no crictl, so the mount is made the way containerd 1.6's mount package
    makes a ``fuse.`` mount: mount.fuse <source> <target> -o <option>... -t <helper>.

    It runs first in the module, so the bytes it fetched are what a Kata pod's host needs."""
    containerd = stack.containerd
    start = len(docker_registry.log())
    containerd.ctr("snapshots", "--snapshotter", "lazysnap", "prepare", "volume-copy",
                   kata_image.top)
    try:
        mount = _mount_of(containerd, "volume-copy")
        _assert_kata_would_pull_in_guest(mount, kata_image.reference)
        mount_type, source, options = mount
        target = tmp_path / "rootfs"
        target.mkdir()
        command = ["mount.fuse", source, str(target)]
        for option in options:
            command += ["-o", option]
        subprocess.run([*command, "-t", mount_type.removeprefix("fuse.")], check=True,
                       capture_output=True, timeout=30)
        try:
            host_volume = tmp_path / "volume"
            shutil.copytree(target / "data", host_volume)
            assert b"app:x:1234:2345" in (target / "etc" / "passwd").read_bytes()
            assert b"app:x:2345" in (target / "etc" / "group").read_bytes()
        finally:
            subprocess.run(["umount", str(target)], check=True, timeout=30)
        assert (host_volume / "seed").read_bytes() == SEED
        served, requests = _layer_bytes_served(docker_registry.log()[start:], kata_image.digests)
        total = stack.pull_served + served
        print(f"\nguest-pull mode, a Kata pod's host work: pull {stack.pull_served} + user and "
              f"volume {served} layer bytes ({requests} requests); image "
              f"{kata_image.compressed_size} bytes compressed: "
              f"{total / kata_image.compressed_size:.1%}")
        assert total < FETCHED_LIMIT * kata_image.compressed_size
    finally:
        containerd.ctr("snapshots", "--snapshotter", "lazysnap", "rm", "volume-copy")


def test_named_user_runs_on_the_lazy_rootfs_and_the_host_fetches_little(
    stack: Stack, docker_registry: RunningRegistry, kata_image: KataImage
) -> None:
    containerd = stack.containerd
    start = len(docker_registry.log())
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", kata_image.reference,
        # A new file is owned by the process's uid:gid (/proc/self would show 0:0: a process
        # that changed its uid is not dumpable).
        "named-user", "/bin/sh", "-c", "echo > /tmp/probe && stat -c %u:%g /tmp/probe",
        timeout=180,
    )
    assert result.stdout.strip() == "1234:2345"
    assert _snapshot_labels(containerd, kata_image.top).get(KATA_GUEST_PULL) == "true"

    run_served, requests = _layer_bytes_served(docker_registry.log()[start:], kata_image.digests)
    total = stack.pull_served + run_served
    share = total / kata_image.compressed_size
    print(f"\nguest-pull mode: pull {stack.pull_served} + named-user run {run_served} layer "
          f"bytes ({requests} requests); image {kata_image.compressed_size} bytes compressed: "
          f"{share:.1%}")
    # busybox, /etc/passwd and /etc/group, and each layer's footer and TOC; no filler.
    assert 0 < total < FETCHED_LIMIT * kata_image.compressed_size


def test_daemon_killed_with_a_guest_pull_container_running(
    stack: Stack, kata_image: KataImage
) -> None:
    containerd = stack.containerd
    name = "survivor"
    containerd.ctr("run", "-d", "--snapshotter", "lazysnap", kata_image.reference, name,
                   "/bin/sleep", "120", timeout=180)
    try:
        _assert_kata_would_pull_in_guest(_mount_of(containerd, name), kata_image.reference)
        stack.daemon.kill9()
        stack.daemon.start()
        _wait_until_containerd_reconnects(containerd)
        # A file nobody has read yet: it must come from the registry, whole and right.
        result = containerd.ctr("task", "exec", "--exec-id", "read", name,
                                "/bin/sha256sum", "/opt/filler2", timeout=120)
        assert result.stdout.split()[0] == hashlib.sha256(kata_image.filler[2]).hexdigest()
        # And the mount containerd still hands out is the Kata one.
        _assert_kata_would_pull_in_guest(_mount_of(containerd, name), kata_image.reference)
    finally:
        containerd.ctr("task", "kill", "--signal", "SIGKILL", name, check=False)
        _wait_task_gone(containerd, name)
        containerd.ctr("container", "rm", name, check=False)


def _wait_task_gone(containerd: RunningContainerd, name: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if containerd.ctr("task", "rm", name, check=False).returncode == 0:
            return
        if name not in containerd.ctr("task", "ls", check=False).stdout:
            return
        time.sleep(0.2)


def test_daemon_refuses_guest_pull_without_its_helper(short_tmp: Path) -> None:
    config = short_tmp / "lazysnap.toml"
    config.write_text(f'[kata]\nguest_pull = true\nmount_helper = "{short_tmp}/nydus-overlayfs-x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "serve", "--config", str(config),
         "--root", str(short_tmp / "root"), "--address", str(short_tmp / "s.sock")],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert result.returncode == 1
    assert "nydus-overlayfs-x is not an executable file" in result.stderr



def test_status_says_guest_pull_mode_is_on(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "status", "--address",
         str(stack.daemon.address), "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    status = json.loads(result.stdout)["kata_guest_pull"]
    assert status["enabled"] is True
    assert is_nydus_rootfs_type(status["mount_type"])
    text = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "status", "--address",
         str(stack.daemon.address)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "kata guest pull: on (fuse." in text
