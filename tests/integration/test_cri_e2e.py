"""The path Kubernetes takes, end to end: a CRI client (as kubelet) → containerd 1.6's real CRI
plugin (``snapshotter = "lazysnap"``, ``disable_snapshot_annotations = false``) → lazysnap, with
images on the loopback docker-registry.

One containerd + lazysnap serves the whole module; every test removes its pods and images, so
the next one starts from a clean CRI state. Pods are host-network, so no CNI plugin is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from snapshotter._proto import snapshots_pb2
from snapshotter.client.chain import chain_ids
from snapshotter.daemon import keeper as fuse_keeper
from snapshotter.labels import REMOTE, REMOTE_VALUE
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

HELLO = b"hello through CRI\n"
_RNG = random.Random(10)
FILES = {name: _RNG.randbytes(200_000) for name in ("first", "second")}
READ_DATA = ("/bin/sh", "-c", "cat /data/hello && sha256sum /data/first")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CriImage:
    reference: str
    diff_ids: tuple[str, ...]

    @property
    def chain(self) -> list[str]:
        return chain_ids(self.diff_ids)


def _data_tar() -> bytes:
    data = oci.TarBuilder().dir("data").file("data/hello", HELLO)
    for name, content in FILES.items():
        data.file(f"data/{name}", content)
    return data.tar()


def _busybox_tar_with(marker: bytes) -> bytes:
    builder = oci.TarBuilder().dir("bin").dir("etc").dir("tmp", 0o1777)
    builder.file("bin/busybox", oci.BUSYBOX.read_bytes(), 0o755)
    for applet in oci.BUSYBOX_APPLETS:
        builder.symlink(f"bin/{applet}", "busybox")
    return builder.file("etc/marker", marker).tar()


def _data_tar_with(marker: bytes) -> bytes:
    data = oci.TarBuilder().dir("data").file("data/hello", HELLO).file("data/marker", marker)
    for name, content in FILES.items():
        data.file(f"data/{name}", content)
    return data.tar()


def _pause_tar() -> bytes:
    # Its own layer: sharing the test images' base layer (same diff ID, so the same chain ID)
    # would make their first layer an existing ordinary snapshot once a pod has run.
    builder = oci.TarBuilder().dir("bin")
    builder.file("bin/busybox", oci.BUSYBOX.read_bytes(), 0o755)
    return builder.symlink("bin/sleep", "busybox").tar()


def _push(registry: RunningRegistry, layout: Path, name: str, layers: tuple[oci.Layer, ...],
          cmd: tuple[str, ...] = ("/bin/sh",)) -> CriImage:
    oci.write_layout(layout, layers, cmd=cmd)
    reference = f"{registry.host}/cri/{name}:1"
    oci.push_layout(layout, "latest", reference)
    return CriImage(reference, tuple(layer.diff_id for layer in layers))


@pytest.fixture(scope="module")
def images(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, CriImage]:
    """Built and pushed once: busybox, then /data; in each layer format, and the pause image."""
    base, data = oci.busybox_tar(), _data_tar()
    variants = {
        "estargz": (oci.seekable_layer(base, "estargz"), oci.seekable_layer(data, "estargz")),
        "zstd-chunked": (
            oci.seekable_layer(base, "zstd:chunked"), oci.seekable_layer(data, "zstd:chunked")
        ),
        "mixed": (oci.seekable_layer(base, "estargz"), oci.gzip_layer(data)),
        "gzip": (oci.gzip_layer(base), oci.gzip_layer(data)),
        # Plain gzip again, with layers of its own (a shared chain ID would find the gzip
        # image's snapshots), indexed below by `lazysnap index`.
        "soci": (
            oci.gzip_layer(_busybox_tar_with(b"indexed\n")),
            oci.gzip_layer(_data_tar_with(b"indexed\n")),
        ),
    }
    pushed = {
        name: _push(docker_registry, tmp_path_factory.mktemp(name), name, layers)
        for name, layers in variants.items()
    }
    # A SOCI v2 index, as `lazysnap index` writes it; the layer blobs stay as they are.
    indexed = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "index", pushed["soci"].reference,
         "--min-layer-size", "0", "--span-size", "64KiB"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert indexed.returncode == 0, indexed.stderr
    # The sandbox's one process: busybox sleep stands in for the pause binary.
    pushed["pause"] = _push(
        docker_registry, tmp_path_factory.mktemp("pause"), "pause", (oci.gzip_layer(_pause_tar()),),
        cmd=("/bin/sleep", "1000000000"),
    )
    return pushed


@dataclass
class CriStack:
    daemon: Daemon
    containerd: RunningContainerd
    client: CriClient
    logs: Path

    def ctr_k8s(self) -> RunningContainerd:
        return replace(self.containerd, namespace=CRI_NAMESPACE)

    def snapshot_labels(self, chain_id: str) -> dict[str, str]:
        info = json.loads(
            self.ctr_k8s().ctr("snapshots", "--snapshotter", "lazysnap", "info", chain_id).stdout
        )
        labels: dict[str, str] = info.get("Labels") or {}
        return labels

    def backend_snapshot_names(self) -> list[str]:
        with self.daemon.snapshots() as stub:
            replies = stub.List(snapshots_pb2.ListSnapshotsRequest(), timeout=30)
            return [info.name for reply in replies for info in reply.info]


@contextlib.contextmanager
def _cri_stack(pause: CriImage, *, disable_snapshot_annotations: bool) -> Iterator[CriStack]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    work = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    config = work / "lazysnap.toml"
    # Files arrive only when read, so reads after a restart really go to the registry.
    config.write_text("[lazy]\nbackground_fetch = false\n")
    cri_settings = CriSettings(
        sandbox_image=pause.reference, disable_snapshot_annotations=disable_snapshot_annotations
    )
    try:
        with running_daemon(work / "d", extra_args=["--config", str(config)]) as daemon, \
                run_containerd(work / "c", daemon.address, cri=cri_settings) as containerd, \
                cri_client(containerd.address) as client:
            yield CriStack(daemon, containerd, client, work / "pods")
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(work / "d" / "root"))
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(images: dict[str, CriImage]) -> Iterator[CriStack]:
    """containerd configured for lazy pulling through CRI, shared by the module's tests."""
    with _cri_stack(images["pause"], disable_snapshot_annotations=False) as shared:
        yield shared


def _remote_layers(stack: CriStack, image: CriImage) -> list[bool]:
    return [stack.snapshot_labels(chain).get(REMOTE) == REMOTE_VALUE for chain in image.chain]


def _run_reading_data(stack: CriStack, image: CriImage, pod_name: str) -> None:
    """A pod with one container that prints /data/hello and the sha256 of /data/first."""
    with running_pod(stack.client, pod_name, stack.logs / pod_name) as pod:
        assert pod.run_to_success("reader", image.reference, READ_DATA) == [
            HELLO.decode().rstrip("\n"), f"{_sha256(FILES['first'])}  /data/first"
        ]


def _in_backend(names: list[str], chain: list[str]) -> list[str]:
    # A lazy layer is committed under its chain ID itself (the snapshot.ref label); containerd
    # names the others "<namespace>/<n>/<chain ID>".
    return [
        name for name in names for chain_id in chain
        if name == chain_id or name.endswith("/" + chain_id)
    ]


def _remove_and_check_gone(stack: CriStack, image: CriImage) -> None:
    before = _in_backend(stack.backend_snapshot_names(), image.chain)
    assert len(before) == len(image.chain), (before, stack.backend_snapshot_names())
    stack.client.remove_image(image.reference)
    assert stack.client.image_status(image.reference) is None
    assert image.reference not in {
        tag for listed in stack.client.listed_images() for tag in listed.repo_tags
    }
    # containerd's garbage collector then removes the layers from lazysnap itself.
    deadline = time.monotonic() + 20
    left = _in_backend(stack.backend_snapshot_names(), image.chain)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _in_backend(stack.backend_snapshot_names(), image.chain)
    assert not left, left


def _wait_until_containerd_reconnects(stack: CriStack) -> None:
    """containerd redials a restarted proxy with gRPC backoff (at most 3 s between tries)."""
    deadline = time.monotonic() + 20
    while True:
        probe = stack.ctr_k8s().ctr("snapshots", "--snapshotter", "lazysnap", "ls", check=False)
        if probe.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert probe.returncode == 0, probe.stderr


@pytest.mark.parametrize("name", ["estargz", "zstd-chunked"])
def test_a_lazy_image_pulled_and_run_through_cri(
    stack: CriStack, images: dict[str, CriImage], name: str
) -> None:
    image = images[name]
    image_id = stack.client.pull(image.reference)
    assert _remote_layers(stack, image) == [True, True], "every layer is a remote snapshot"

    status = stack.client.image_status(image.reference)
    assert status is not None
    assert status.id == image_id
    assert image.reference in status.repo_tags
    assert status.size > 0
    assert image_id in {listed.id for listed in stack.client.listed_images()}

    _run_reading_data(stack, image, f"lazy-{name}")
    _remove_and_check_gone(stack, image)


def test_a_mixed_and_a_plain_gzip_image_still_run_through_cri(
    stack: CriStack, images: dict[str, CriImage]
) -> None:
    mixed, plain = images["mixed"], images["gzip"]
    stack.client.pull(mixed.reference)
    stack.client.pull(plain.reference)
    # The eStargz base is lazy; the gzip layers are downloaded and applied by containerd.
    assert _remote_layers(stack, mixed) == [True, False]
    assert _remote_layers(stack, plain) == [False, False]
    _run_reading_data(stack, mixed, "mixed")
    _run_reading_data(stack, plain, "plain")
    _remove_and_check_gone(stack, mixed)
    _remove_and_check_gone(stack, plain)


def test_a_plain_gzip_image_indexed_by_lazysnap_index_is_lazy_through_cri(
    stack: CriStack, images: dict[str, CriImage]
) -> None:
    """Nothing but the CRI labels reaches the daemon: it finds the SOCI index through the
    manifest's annotation and serves both plain gzip layers lazily."""
    image = images["soci"]
    stack.client.pull(image.reference)
    assert _remote_layers(stack, image) == [True, True], stack.daemon.log()[-3000:]
    _run_reading_data(stack, image, "soci")
    _remove_and_check_gone(stack, image)


def test_a_lazy_image_runs_after_a_kill_9_of_the_daemon_between_pull_and_start(
    stack: CriStack, images: dict[str, CriImage]
) -> None:
    image = images["zstd-chunked"]
    stack.client.pull(image.reference)
    assert _remote_layers(stack, image) == [True, True]

    stack.daemon.kill9()
    stack.daemon.start()
    _wait_until_containerd_reconnects(stack)

    _run_reading_data(stack, image, "after-kill")
    _remove_and_check_gone(stack, image)


def test_a_cri_container_reads_new_files_across_a_daemon_restart(
    stack: CriStack, images: dict[str, CriImage]
) -> None:
    image = images["estargz"]
    stack.client.pull(image.reference)
    assert _remote_layers(stack, image) == [True, True]
    with running_pod(stack.client, "across-restart", stack.logs / "across-restart") as pod:
        container = pod.start_container(
            "app", image.reference, ("/bin/sh", "-c", "cat /data/hello && exec sleep 3600")
        )
        first = pod.exec_sync(container, "/bin/sha256sum", "/data/first")
        assert first.split()[0].decode() == _sha256(FILES["first"])

        log_start = len(stack.daemon.log())
        stack.daemon.kill9()
        stack.daemon.start()
        assert "fuse connection taken over from the keeper" in stack.daemon.log()[log_start:]

        # Never read before the restart: the new daemon fetches it.
        second = pod.exec_sync(container, "/bin/sha256sum", "/data/second")
        assert second.split()[0].decode() == _sha256(FILES["second"])
        assert pod.log_lines("app") == [HELLO.decode().rstrip("\n")]
        pod.stop_and_remove_container(container)
    _wait_until_containerd_reconnects(stack)
    _remove_and_check_gone(stack, image)


def test_with_the_daemon_down_cri_pulls_fail_unavailable_and_work_once_it_is_back(
    stack: CriStack, images: dict[str, CriImage]
) -> None:
    image = images["estargz"]
    stack.daemon.stop()
    with pytest.raises(grpc.RpcError) as failed:
        stack.client.pull(image.reference)
    # What kubelet reports as ErrImagePull: the snapshotter call containerd could not make.
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to prepare extraction snapshot" in str(failed.value.details())
    assert stack.client.image_status(image.reference) is None

    stack.daemon.start()
    _wait_until_containerd_reconnects(stack)
    stack.client.pull(image.reference)
    assert _remote_layers(stack, image) == [True, True]
    _run_reading_data(stack, image, "daemon-back")
    _remove_and_check_gone(stack, image)


def test_with_snapshot_annotations_disabled_images_run_but_nothing_is_lazy(
    images: dict[str, CriImage],
) -> None:
    image = images["estargz"]
    with _cri_stack(images["pause"], disable_snapshot_annotations=True) as off:
        off.client.pull(image.reference)
        assert _remote_layers(off, image) == [False, False]
        assert "reason='no cri.image-ref / cri.layer-digest labels" in off.daemon.log()
        _run_reading_data(off, image, "annotations-off")
