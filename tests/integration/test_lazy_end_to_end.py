"""Lazy pulling end to end, with only real parts: Debian's containerd 1.6 + runc, the
docker-registry on loopback and the lazysnap daemon.

A test image (busybox-static plus a slice of /usr/lib/python3.11 over three layers) is pushed
as plain gzip, converted with ``lazysnap convert`` to eStargz and to zstd:chunked, pulled with
``lazysnap pull`` and run with ``ctr run --snapshotter lazysnap``, with a kill -9 and restart of
the daemon between pull and run. The registry's access log tells how many layer bytes the
container needed; a read-everything container must see exactly the tree an ordinary overlayfs
pull of the plain image gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from snapshotter.client.chain import chain_ids
from snapshotter.labels import REMOTE, REMOTE_VALUE
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd
from tests.support.daemon import Daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.lazy_e2e import (
    HELLO,
    READ_EVERYTHING,
    add_host_files,
    base_layer,
    lazy_stack,
    python_files,
    tree,
    tree_after_overlayfs_pull,
)
from tests.support.marks import full_stack

pytestmark = full_stack()

T = TypeVar("T")

FETCHED_LIMIT = 0.5  # the small-file container may need at most this share of the image


@dataclass(frozen=True)
class PlainImage:
    reference: str
    layers: tuple[oci.Layer, ...]

    @property
    def compressed_size(self) -> int:
        return sum(len(layer.blob) for layer in self.layers)


@dataclass(frozen=True)
class ConvertedImage:
    reference: str
    manifest_digest: str
    layers: tuple[dict[str, Any], ...]  # descriptors from the pushed manifest
    diff_ids: tuple[str, ...]

    @property
    def compressed_size(self) -> int:
        return sum(int(layer["size"]) for layer in self.layers)

    @property
    def chain(self) -> list[str]:
        return chain_ids(self.diff_ids)


@pytest.fixture(scope="module")
def plain_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> PlainImage:
    """busybox and /etc/hello, then the python slice in two layers.

    /etc/hello sits next to busybox on purpose: the fetcher reads neighbouring small files of
    a layer ahead (ranges of up to 4 MiB), so a small file inside a layer of small files would
    bring its neighbours along; here the measurement shows what the container needed."""
    files = python_files()
    half = len(files) // 2
    layers = (
        oci.gzip_layer(base_layer()),
        oci.gzip_layer(add_host_files(oci.TarBuilder(), files[:half]).tar()),
        oci.gzip_layer(add_host_files(oci.TarBuilder(), files[half:]).tar()),
    )
    layout = tmp_path_factory.mktemp("e2e-layout")
    oci.write_layout(layout, layers)
    reference = f"{docker_registry.host}/e2e/app:plain"
    oci.push_layout(layout, "latest", reference)
    return PlainImage(reference, layers)


def _lazysnap(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def _registry_get(registry: RunningRegistry, path: str) -> bytes:
    request = urllib.request.Request(
        f"{registry.url}/v2/{path}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        body: bytes = answer.read()
    return body


@pytest.fixture(scope="module")
def converted(
    docker_registry: RunningRegistry, plain_image: PlainImage
) -> dict[str, ConvertedImage]:
    """The plain image converted once per format (conversion is not what is measured)."""
    images: dict[str, ConvertedImage] = {}
    for fmt in ("estargz", "zstd:chunked"):
        tag = fmt.replace(":", "-")
        reference = f"{docker_registry.host}/e2e/app:{tag}"
        result = _lazysnap("convert", plain_image.reference, reference, "--format", fmt)
        assert result.returncode == 0, result.stderr
        manifest = json.loads(_registry_get(docker_registry, f"e2e/app/manifests/{tag}"))
        config = json.loads(
            _registry_get(docker_registry, f"e2e/app/blobs/{manifest['config']['digest']}")
        )
        digest = result.stdout.split()[-1]
        images[fmt] = ConvertedImage(
            reference, digest, tuple(manifest["layers"]), tuple(config["rootfs"]["diff_ids"])
        )
    return images


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    """lazysnap without background fetch (so the registry serves only what containers read)
    and containerd 1.6 with lazysnap as its proxy snapshotter."""
    with lazy_stack(short_tmp, background_fetch=False) as running:
        yield running


def _pull(containerd: RunningContainerd, reference: str) -> str:
    hosts_dir = containerd.workdir / "certs.d"  # empty: loopback registries get plain HTTP
    hosts_dir.mkdir(exist_ok=True)
    result = _lazysnap(
        "pull", reference, "--address", str(containerd.address),
        "--namespace", containerd.namespace, "--hosts-dir", str(hosts_dir),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _run(
    containerd: RunningContainerd, reference: str, name: str, *cmd: str,
    snapshotter: str = "lazysnap",
) -> str:
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", snapshotter, reference, name, *cmd, timeout=180
    )
    return result.stdout


def _wait_for(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = probe()
    return value


def _wait_until_containerd_reconnects(containerd: RunningContainerd) -> None:
    """containerd redials a restarted proxy with gRPC backoff (at most 3 s between tries)."""
    ok = _wait_for(
        lambda: containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls", check=False),
        lambda result: result.returncode == 0,
    )
    assert ok.returncode == 0, ok.stderr


def _snapshot_labels(containerd: RunningContainerd, chain_id: str) -> dict[str, str]:
    info = json.loads(
        containerd.ctr("snapshots", "--snapshotter", "lazysnap", "info", chain_id).stdout
    )
    labels: dict[str, str] = info.get("Labels") or {}
    return labels


_LOG_GET = re.compile(
    r'http\.request\.method=GET .*?http\.request\.uri="(?P<uri>[^"]+)"'
    r".*?http\.response\.written=(?P<written>\d+)"
)


def _layer_bytes_served(log: str, digests: Sequence[str]) -> tuple[int, int]:
    """(bytes, requests) of layer blob GETs in a docker-registry text log."""
    total = requests = 0
    for match in _LOG_GET.finditer(log):
        if any(match["uri"].endswith("/blobs/" + digest) for digest in digests):
            total += int(match["written"])
            requests += 1
    return total, requests


@pytest.fixture(scope="module")
def overlayfs_tree(plain_image: PlainImage) -> list[str]:
    seen = tree_after_overlayfs_pull(plain_image.reference)
    assert any(line.endswith("/etc/hello") for line in seen)
    return seen


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_converted_image_runs_lazily_and_reads_like_overlayfs(
    fmt: str,
    stack: tuple[Daemon, RunningContainerd],
    docker_registry: RunningRegistry,
    plain_image: PlainImage,
    converted: dict[str, ConvertedImage],
    overlayfs_tree: list[str],
) -> None:
    daemon, containerd = stack
    image = converted[fmt]
    log_start = len(docker_registry.log())

    pulled = _pull(containerd, image.reference)
    outcomes = [line.split()[3] for line in pulled.splitlines() if line.startswith("layer ")]
    assert outcomes == ["remote"] * len(image.layers), pulled

    # The daemon dies hard between pull and run (leaving its dead FUSE mount for the new one
    # to deal with); containerd reconnects to the new one.
    daemon.kill9()
    daemon.start()
    _wait_until_containerd_reconnects(containerd)

    assert _run(containerd, image.reference, "small", "/bin/cat", "/etc/hello") == HELLO.decode()
    for chain_id in image.chain:
        labels = _snapshot_labels(containerd, chain_id)
        assert labels.get(REMOTE) == REMOTE_VALUE, (chain_id, labels)

    served, requests = _layer_bytes_served(
        docker_registry.log()[log_start:], [layer["digest"] for layer in image.layers]
    )
    share = served / image.compressed_size
    print(
        f"\n{fmt}: pull + run of `cat /etc/hello` fetched {served} layer bytes in {requests} "
        f"requests; image {image.compressed_size} bytes compressed "
        f"(plain gzip {plain_image.compressed_size}): {share:.1%}"
    )
    # What that is: busybox (the container's every command), /etc/hello, and each layer's
    # footer + TOC (one read of the blob's last 512 KiB), not the python layers' files.
    assert 0 < served < FETCHED_LIMIT * image.compressed_size

    everything = _run(containerd, image.reference, "all", "/bin/sh", "-c", READ_EVERYTHING)
    assert tree(everything) == overlayfs_tree


def test_containers_run_on_a_passthrough_mount_and_read_like_overlayfs(
    short_tmp: Path,
    converted: dict[str, ConvertedImage],
    overlayfs_tree: list[str],
) -> None:
    """``[fuse] passthrough = "auto"``: containerd's overlayfs mounts over the FUSE mount (the
    stack depth it claims leaves room), and busybox, 1.9 MiB, whole in the cache once its first
    exec fetched it, is executed again and again from its backing copy; every file's sha256 is
    still overlayfs's."""
    with lazy_stack(short_tmp, background_fetch=False,
                    config_text='[fuse]\npassthrough = "auto"\n') as (daemon, containerd):
        image = converted["estargz"]
        _pull(containerd, image.reference)
        if "passthrough=on" not in daemon.log():
            pytest.skip(f"the kernel ({os.uname().release}) did not offer FUSE passthrough "
                        "(needs Linux >= 6.9 built with CONFIG_FUSE_PASSTHROUGH)")
        assert _run(containerd, image.reference, "small", "/bin/cat", "/etc/hello") == (
            HELLO.decode())
        everything = _run(containerd, image.reference, "all", "/bin/sh", "-c", READ_EVERYTHING)
        assert tree(everything) == overlayfs_tree
        assert "passthrough backing file registered" in daemon.log()
        again = _run(containerd, image.reference, "again", "/bin/sh", "-c", READ_EVERYTHING)
        assert tree(again) == overlayfs_tree


def test_plain_gzip_image_pulled_with_lazysnap_still_runs(
    stack: tuple[Daemon, RunningContainerd], plain_image: PlainImage
) -> None:
    _daemon, containerd = stack
    pulled = _pull(containerd, plain_image.reference)
    outcomes = [line.split()[3] for line in pulled.splitlines() if line.startswith("layer ")]
    assert outcomes == ["applied"] * len(plain_image.layers), pulled
    assert _run(containerd, plain_image.reference, "plain", "/bin/cat", "/etc/hello") == (
        HELLO.decode()
    )


def test_ctr_remote_rpull_gives_remote_snapshots_and_the_container_runs(
    stack: tuple[Daemon, RunningContainerd],
    docker_registry: RunningRegistry,
    converted: dict[str, ConvertedImage],
) -> None:
    """stargz-snapshotter's own client, unchanged: Debian's ctr-remote labels each layer's
    Prepare with stargz.reference / .digest / .layers and no cri.* labels."""
    if shutil.which("ctr-remote") is None:
        pytest.skip("ctr-remote (Debian's stargz-snapshotter) is not installed")
    _daemon, containerd = stack
    image = converted["estargz"]
    log_start = len(docker_registry.log())
    started = time.monotonic()
    result = subprocess.run(
        ["ctr-remote", "--address", str(containerd.address), "--namespace",
         containerd.namespace, "image", "rpull", "--snapshotter", "lazysnap", "--plain-http",
         image.reference],
        capture_output=True, text=True, timeout=180, check=False,
    )
    pull_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr + containerd.log()[-3000:]
    for chain_id in image.chain:
        labels = _snapshot_labels(containerd, chain_id)
        assert labels.get(REMOTE) == REMOTE_VALUE, (chain_id, labels)

    assert _run(containerd, image.reference, "rpulled", "/bin/cat", "/etc/hello") == (
        HELLO.decode()
    )
    served, requests = _layer_bytes_served(
        docker_registry.log()[log_start:], [layer["digest"] for layer in image.layers]
    )
    print(f"\nctr-remote rpull: {pull_seconds:.2f}s; pull + run of `cat /etc/hello` fetched "
          f"{served} of {image.compressed_size} layer bytes in {requests} requests")
    assert 0 < served < FETCHED_LIMIT * image.compressed_size
