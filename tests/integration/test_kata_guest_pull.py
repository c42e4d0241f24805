"""Kata guest-pull mode with real parts: Debian's containerd 1.6 + runc, the docker-registry on
loopback, the lazysnap daemon with ``--kata-guest-pull`` and its mount helper.

There is no VM here: a runc container stands for the host's side of a Kata pod. containerd
mounts the container's one ``fuse.…nydus-overlayfs-lazysnap`` mount through ``mount.fuse`` and
the helper, resolves a named user from the lazily served ``/etc/passwd`` and runs the container;
its CRI plugin also copies an image VOLUME's contents through that mount. The same mount, as
containerd hands it to a runtime, passes Kata's parser and type check (ported in
tests/snapshotter/store/kata_rules.py). The registry's access log tells what the host fetched.
One daemon, containerd (with its CRI plugin on) and image serve the whole module (CI time).
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from snapshotter.client.chain import chain_ids
from snapshotter.daemon import keeper as fuse_keeper
from snapshotter.labels import KATA_GUEST_PULL, REMOTE, REMOTE_VALUE
from snapshotter.store.guest_pull import VOLUME_OPTION
from tests.integration.test_cri_e2e import _pause_tar
from tests.integration.test_cri_e2e import _push as _push_pause
from tests.integration.test_lazy_end_to_end import (
    _layer_bytes_served,
    _pull,
    _snapshot_labels,
    _wait_until_containerd_reconnects,
)
from tests.snapshotter.store.kata_rules import is_nydus_rootfs_type, kata_accepts
from tests.support import oci_image as oci
from tests.support.containerd import (
    CRI_NAMESPACE,
    CriSettings,
    RunningContainerd,
    containerd_available,
    run_containerd,
)
from tests.support.cri import CriClient, cri_client, running_pod
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.marks import full_stack

pytestmark = full_stack()

APP_UID_GID = "1234:2345"  # the image USER app's, from its /etc/passwd
FILLER_FILES = 4
FILLER_BYTES = 1 << 20  # each; random, so compression cannot shrink what a read would fetch
FETCHED_LIMIT = 0.5  # a named-user `true` may need at most this share of the image
HOST_WORK_LIMIT = 64 * 1024  # /etc/passwd, /etc/group and /data/seed: a few hundred bytes


@dataclass(frozen=True)
class KataImage:
    reference: str
    layers: tuple[oci.Layer, ...]
    filler: tuple[bytes, ...]
    seed: bytes  # /data/seed, the VOLUME's content

    @property
    def compressed_size(self) -> int:
        return sum(len(layer.blob) for layer in self.layers)

    @property
    def digests(self) -> list[str]:
        return [oci.sha256(layer.blob) for layer in self.layers]

    @property
    def top(self) -> str:
        return chain_ids([layer.diff_id for layer in self.layers])[-1]


def _push_kata_image(registry: RunningRegistry, layout: Path, name: str) -> KataImage:
    """busybox with a named USER and a VOLUME /data holding a file, then 4 MiB of filler.

    Every file read in the tests carries ``name``: lazysnap's chunk cache is content-addressed,
    so a file two images share would be served from the cache for the second one, and the
    registry log would no longer tell what each needs. busybox gets the name appended after
    its ELF data, which the loader ignores."""
    tag = name.encode()
    passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:%s:/home/app:/bin/sh\n" % tag
    group = b"root:x:0:\napp:x:2345:\n%s:x:3456:\n" % tag
    seed = b"copied from the %s image into the volume\n" % tag
    base = oci.TarBuilder().dir("bin").dir("etc").dir("tmp", 0o1777).dir("data", 0o1777)
    base.file("bin/busybox", oci.BUSYBOX.read_bytes() + b"\0" + tag, 0o755)
    for applet in oci.BUSYBOX_APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.file("etc/passwd", passwd).file("etc/group", group).file("data/seed", seed)
    rng = random.Random(name)
    filler = tuple(rng.randbytes(FILLER_BYTES) for _ in range(FILLER_FILES))
    second = oci.TarBuilder().dir("opt")
    for i, data in enumerate(filler):
        second.file(f"opt/filler{i}", data)
    layers = (oci.seekable_layer(base.tar(), "estargz"),
              oci.seekable_layer(second.tar(), "estargz"))
    oci.write_layout(layout, layers, volumes=["/data"], user="app")
    reference = f"{registry.host}/kata/{name}:1"
    oci.push_layout(layout, "latest", reference)
    return KataImage(reference, layers, filler, seed)


@pytest.fixture(scope="module")
def kata_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> KataImage:
    """The image the ctr tests run, pulled by the module's stack with ``lazysnap pull``.

    The user is the image's USER: ctr 1.6 has no --user flag, and resolves the image's USER
    on the host the way ``ctr run --user`` does in later versions (oci.WithUser: a temporary
    mount of the container's snapshot, then /etc/passwd and /etc/group read from it)."""
    return _push_kata_image(docker_registry, tmp_path_factory.mktemp("kata-layout"), "app")


@pytest.fixture(scope="module")
def cri_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> KataImage:
    """The same shape of image for the CRI test, pulled only by CRI."""
    return _push_kata_image(docker_registry, tmp_path_factory.mktemp("kata-cri-layout"),
                            "cri-app")


@pytest.fixture(scope="module")
def pause_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The sandbox image: plain gzip, so CRI unpacks it as an ordinary layer."""
    return _push_pause(
        docker_registry, tmp_path_factory.mktemp("kata-pause"), "kata-pause",
        (oci.gzip_layer(_pause_tar()),), cmd=("/bin/sleep", "1000000000"),
    ).reference


@dataclass
class Stack:
    daemon: Daemon
    containerd: RunningContainerd
    cri: CriClient
    pods: Path  # the pods' log directories
    pull_served: int  # layer bytes the registry served for the pull itself


@pytest.fixture(scope="module")
def stack(
    docker_registry: RunningRegistry, kata_image: KataImage, pause_image: str
) -> Iterator[Stack]:
    """lazysnap in guest-pull mode without background fetch (the registry serves only what the
    host reads), containerd 1.6 using it, also as its CRI plugin's snapshotter, and the image
    pulled lazily."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    work = Path(tempfile.mkdtemp(prefix="lk", dir="/tmp"))
    config = work / "lazysnap.toml"
    config.write_text("[lazy]\nbackground_fetch = false\n")
    try:
        with running_daemon(work / "d", extra_args=["--config", str(config),
                                                   "--kata-guest-pull"]) as daemon, \
                run_containerd(work / "c", daemon.address,
                               cri=CriSettings(sandbox_image=pause_image)) as containerd, \
                cri_client(containerd.address) as client:
            start = len(docker_registry.log())
            pulled = _pull(containerd, kata_image.reference)
            outcomes = [line.split()[3] for line in pulled.splitlines()
                        if line.startswith("layer ")]
            assert outcomes == ["remote"] * len(kata_image.layers), pulled
            served, _ = _layer_bytes_served(docker_registry.log()[start:], kata_image.digests)
            yield Stack(daemon, containerd, client, work / "pods", served)
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(work / "d" / "root"))
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


def _kata_volume(mount: tuple[str, str, list[str]]) -> dict[str, Any]:
    """The volume of a mount Kata would leave to the guest, as Kata's parser reads it."""
    mount_type, source, options = mount
    assert is_nydus_rootfs_type(mount_type), mount_type
    assert source == "overlay"
    assert {o.split("=", 1)[0] for o in options} >= {"lowerdir", "upperdir", "workdir"}
    (volume,) = [o[len(VOLUME_OPTION):] for o in options if o.startswith(VOLUME_OPTION)]
    return kata_accepts(volume)


def _assert_kata_would_pull_in_guest(
    mount: tuple[str, str, list[str]], reference: str
) -> None:
    assert _kata_volume(mount)["source"] == reference


def test_cri_copies_the_image_volume_through_the_kata_mount_and_runs_the_named_user(
    stack: Stack, docker_registry: RunningRegistry, cri_image: KataImage
) -> None:
    """What kubelet asks of containerd 1.6's CRI plugin for a Kata pod, with runc standing in
    for the VM. CreateContainer is the host's share of the work: CRI mounts the container's
    one ``fuse.…nydus-overlayfs-lazysnap`` rootfs through mount.fuse and the helper, copies the
    image VOLUME's contents into a host directory (``WithVolumes``) and resolves the image's
    named USER (``oci.WithUser``, ``WithAdditionalGIDs``). StartContainer is what a Kata guest
    would do instead: runc runs busybox from the lazy rootfs on the host."""
    log = docker_registry.log
    start = len(log())
    stack.cri.pull(cri_image.reference)
    pulled = len(log())
    k8s = replace(stack.containerd, namespace=CRI_NAMESPACE)
    top_labels = json.loads(k8s.ctr("snapshots", "--snapshotter", "lazysnap", "info",
                                    cri_image.top).stdout)["Labels"]
    assert top_labels[REMOTE] == REMOTE_VALUE and top_labels[KATA_GUEST_PULL] == "true"

    with running_pod(stack.cri, "kata-volume", stack.pods / "kata-volume") as pod:
        container = pod.create_container("app", cri_image.reference, (
            "/bin/sh", "-c",
            # A new file is owned by the process's uid:gid. /data is the volume when its device
            # is not the rootfs's.
            "cat /data/seed && echo > /tmp/probe && stat -c %u:%g /tmp/probe"
            " && stat -c %d / /data && echo written > /data/by-the-container",
        ))
        created = len(log())
        _assert_kata_would_pull_in_guest(_mount_of(k8s, container), cri_image.reference)
        # The sandbox's rootfs too, though containerd unpacked the (gzip) pause image.
        assert _kata_volume(_mount_of(k8s, pod.sandbox_id))["volume_type"] == "image_guest_pull"

        pod.start(container)
        status = pod.wait_exited(container)
        assert status.exit_code == 0, (status, pod.log_lines("app"))
        seed, owner, root_device, data_device, *rest = pod.log_lines("app")
        assert (seed, owner, rest) == (cri_image.seed.decode().rstrip("\n"), APP_UID_GID, [])
        assert root_device != data_device

        # containerd's copy, on the host: the image's file and the one the container wrote.
        volumes = (stack.containerd.workdir / "root" / "io.containerd.grpc.v1.cri" /
                   "containers" / container / "volumes")
        (volume,) = volumes.iterdir()
        assert (volume / "seed").read_bytes() == cri_image.seed
        assert (volume / "by-the-container").read_bytes() == b"written\n"
        pod.stop_and_remove_container(container)
    ran = len(log())

    digests = cri_image.digests
    pull, _ = _layer_bytes_served(log()[start:pulled], digests)
    host, host_requests = _layer_bytes_served(log()[pulled:created], digests)
    run, _ = _layer_bytes_served(log()[created:ran], digests)
    size = cri_image.compressed_size
    print(f"\nguest-pull mode through CRI, layer bytes served; image {size} bytes compressed:"
          f"\n  PullImage {pull} ({pull / size:.1%})"
          f"\n  CreateContainer (user, group, volume copy) {host} in {host_requests} requests"
          f" ({host / size:.3%})"
          f"\n  StartContainer with runc (busybox on the host) {run} ({run / size:.1%})")
    # The host of a Kata pod reads the tail windows and three small files, never the filler.
    assert 0 < pull + host < FETCHED_LIMIT * size
    assert 0 < host < HOST_WORK_LIMIT


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
    assert result.stdout.strip() == APP_UID_GID
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
