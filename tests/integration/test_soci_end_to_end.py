"""Plain gzip images served lazily through SOCI indexes, with only real parts: Debian's
containerd 1.6 + runc, the docker-registry on loopback (2.8: no referrers API, so v1 indexes
are found through the referrers tag) and the lazysnap daemon.

The image is built here and left as it is: busybox with /etc/hello, then a layer with a slice
of /usr/lib/python3.11 and two generated files of several MiB, so files cross spans. Its zTOCs
are built with ``build_ztoc`` and published as a SOCI index, v1 (subject + referrers tag) or v2
(the manifest's annotation names it). ``lazysnap pull`` must give remote snapshots, the
container must run and read exactly what an overlayfs pull gives, and ``cat /etc/hello`` must
need a small share of the layer bytes.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from fusefs.formats.ztoc import build_ztoc
from registry import create_client, fallback_tag, parse_reference
from snapshotter.client.chain import chain_ids
from snapshotter.labels import REMOTE, REMOTE_VALUE
from snapshotter.soci_index import (
    EMPTY_CONFIG,
    IMAGE_INDEX_DIGEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SOCI_INDEX_V1,
    SociIndex,
    Subject,
    ZtocDescriptor,
    build,
)
from tests.integration.test_lazy_end_to_end import (
    _layer_bytes_served,
    _lazysnap,
    _pull,
    _run,
    _snapshot_labels,
    _wait_until_containerd_reconnects,
    stack,
)
from tests.support import lazy_e2e
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd
from tests.support.daemon import Daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.marks import full_stack

pytestmark = full_stack()
__all__ = ["stack"]  # the fixture, shared with the eStargz end-to-end tests

SPAN = 1 << 20
FETCHED_LIMIT = 0.5
GZIP = oci.MEDIA_LAYER_GZIP


def _words(size: int, seed: int) -> bytes:
    """Text-like bytes (Huffman blocks, so spans start at bit offsets), several MiB."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 8)).hex().encode() for _ in range(4000)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b"\n"
    return bytes(out[:size])


def _data_layer() -> bytes:
    builder = oci.TarBuilder().dir("data")
    builder.file("data/big-text", _words(6 << 20, 1))
    builder.file("data/big-mixed", _words(3 << 20, 2) + random.Random(3).randbytes(2 << 20))
    return lazy_e2e.add_host_files(builder, lazy_e2e.python_files()[:400]).tar()


@dataclass(frozen=True)
class SociImage:
    reference: str
    manifest_digest: str
    layers: tuple[oci.Layer, ...]

    @property
    def compressed_size(self) -> int:
        return sum(len(layer.blob) for layer in self.layers)

    @property
    def chain(self) -> list[str]:
        return chain_ids([layer.diff_id for layer in self.layers])


def _manifest(layers: tuple[oci.Layer, ...], annotations: Mapping[str, str]) -> tuple[bytes, bytes]:
    """(config, manifest) bytes of a linux image of ``layers``."""
    layout = Path(tempfile.mkdtemp(prefix="lz-soci-layout"))
    try:
        digest = oci.write_layout(layout, layers)
        manifest = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())
        config = (layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes()
    finally:
        shutil.rmtree(layout, ignore_errors=True)
    if annotations:
        manifest["annotations"] = dict(annotations)
    return config, json.dumps(manifest).encode()


async def _push_image(
    registry: RunningRegistry, reference: str, layers: tuple[oci.Layer, ...], version: int,
    ztocs: Mapping[str, bytes],
) -> str:
    """Push the image, its zTOCs and a SOCI index of ``version``; the image manifest digest.
    Each reference gets a manifest of its own (an annotation names the tag): the referrers
    tag of one manifest holds one list."""
    hosts = Path(tempfile.mkdtemp(prefix="lz-soci-hosts"))  # empty: loopback is plain HTTP
    ref = parse_reference(reference)
    own = {"org.example.variant": reference.rpartition(":")[2]}
    try:
        async with create_client(hosts) as client:
            for layer in layers:
                await client.push_blob(ref, layer.blob)
            descriptors = {}
            for layer_digest, data in ztocs.items():
                pushed = await client.push_blob(ref, data)
                descriptors[layer_digest] = ZtocDescriptor(
                    pushed.digest, len(data), layer_digest, GZIP, SPAN
                )
            await client.push_blob(ref, EMPTY_CONFIG)
            if not ztocs:
                config, manifest = _manifest(layers, own)
                await client.push_blob(ref, config)
                return await client.push_manifest(ref, manifest, OCI_MANIFEST)
            if version == 2:
                index = build(SociIndex(2, descriptors, None, "lazysnap-test"))
                index_digest = await client.push_manifest(
                    parse_reference(f"{ref.domain}/{ref.path}@{oci.sha256(index)}"),
                    index, OCI_MANIFEST,
                )
                config, manifest = _manifest(layers, {**own, IMAGE_INDEX_DIGEST: index_digest})
            else:
                config, manifest = _manifest(layers, own)
            await client.push_blob(ref, config)
            manifest_digest = await client.push_manifest(ref, manifest, OCI_MANIFEST)
            if version == 1:
                subject = Subject(OCI_MANIFEST, manifest_digest, len(manifest))
                index = build(SociIndex(1, descriptors, subject, "lazysnap-test"))
                index_digest = await client.push_manifest(
                    parse_reference(f"{ref.domain}/{ref.path}@{oci.sha256(index)}"),
                    index, OCI_MANIFEST,
                )
                listed = {
                    "schemaVersion": 2, "mediaType": OCI_INDEX,
                    "manifests": [{"mediaType": OCI_MANIFEST, "digest": index_digest,
                                   "size": len(index), "artifactType": SOCI_INDEX_V1}],
                }
                await client.push_manifest(
                    parse_reference(f"{ref.domain}/{ref.path}:{fallback_tag(manifest_digest)}"),
                    json.dumps(listed).encode(), OCI_INDEX,
                )
            return manifest_digest
    finally:
        shutil.rmtree(hosts, ignore_errors=True)


@pytest.fixture(scope="module")
def layers() -> tuple[oci.Layer, ...]:
    return (oci.gzip_layer(lazy_e2e.base_layer()), oci.gzip_layer(_data_layer()))


def _ztocs(layers: tuple[oci.Layer, ...]) -> dict[str, bytes]:
    return {
        layer.digest: build_ztoc(io.BytesIO(layer.blob), span_size=SPAN).data for layer in layers
    }


@pytest.fixture(scope="module")
def images(docker_registry: RunningRegistry, layers: tuple[oci.Layer, ...]) -> dict[str, Any]:
    ztocs = _ztocs(layers)
    found: dict[str, Any] = {}
    for version in (1, 2):
        reference = f"{docker_registry.host}/soci/app:v{version}"
        digest = trio.run(_push_image, docker_registry, reference, layers, version, ztocs)
        found[f"v{version}"] = SociImage(reference, digest, layers)
    # A v1 index whose zTOCs are swapped: each names the other layer's, which cannot fit.
    swapped = dict(zip(ztocs, reversed(list(ztocs.values())), strict=True))
    reference = f"{docker_registry.host}/soci/app:swapped"
    digest = trio.run(_push_image, docker_registry, reference, layers, 1, swapped)
    found["swapped"] = SociImage(reference, digest, layers)
    return found


@pytest.fixture(scope="module")
def overlayfs_tree(images: dict[str, Any]) -> list[str]:
    seen = lazy_e2e.tree_after_overlayfs_pull(images["v1"].reference)
    assert any(line.endswith("/data/big-text") for line in seen)
    return seen


def _outcomes(pulled: str) -> list[str]:
    return [line.split()[3] for line in pulled.splitlines() if line.startswith("layer ")]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_plain_gzip_image_with_a_soci_index_runs_lazily_and_reads_like_overlayfs(
    version: str,
    stack: tuple[Daemon, RunningContainerd],
    docker_registry: RunningRegistry,
    images: dict[str, Any],
    overlayfs_tree: list[str],
) -> None:
    daemon, containerd = stack
    image: SociImage = images[version]
    log_start = len(docker_registry.log())

    pulled = _pull(containerd, image.reference)
    assert _outcomes(pulled) == ["remote"] * len(image.layers), pulled + daemon.log()[-3000:]
    # A hard restart between pull and run: the layers come back from the zTOCs saved at
    # attach, without asking the registry for them again.
    daemon.kill9()
    daemon.start()
    _wait_until_containerd_reconnects(containerd)
    assert "remote layer restored" in daemon.log()
    assert _run(containerd, image.reference, "small", "/bin/cat", "/etc/hello") == (
        lazy_e2e.HELLO.decode()
    )
    for chain_id in image.chain:
        assert _snapshot_labels(containerd, chain_id).get(REMOTE) == REMOTE_VALUE

    digests = [layer.digest for layer in image.layers]
    served, requests = _layer_bytes_served(docker_registry.log()[log_start:], digests)
    print(f"\nsoci {version}: pull + `cat /etc/hello` fetched {served} of "
          f"{image.compressed_size} layer bytes in {requests} requests")
    assert 0 < served < FETCHED_LIMIT * image.compressed_size

    everything = _run(containerd, image.reference, "all", "/bin/sh", "-c", lazy_e2e.READ_EVERYTHING)
    assert lazy_e2e.tree(everything) == overlayfs_tree


def test_a_ztoc_that_does_not_fit_its_layer_is_refused_and_the_layer_pulled_in_full(
    stack: tuple[Daemon, RunningContainerd], images: dict[str, Any]
) -> None:
    daemon, containerd = stack
    image: SociImage = images["swapped"]
    pulled = _pull(containerd, image.reference)
    assert _outcomes(pulled) == ["applied"] * len(image.layers), pulled
    assert "soci ztoc refused" in daemon.log()
    assert _run(containerd, image.reference, "swapped", "/bin/cat", "/etc/hello") == (
        lazy_e2e.HELLO.decode()
    )


def test_an_image_without_an_index_is_looked_up_once_and_pulled_in_full(
    stack: tuple[Daemon, RunningContainerd], docker_registry: RunningRegistry,
    layers: tuple[oci.Layer, ...],
) -> None:
    _daemon, containerd = stack
    reference = f"{docker_registry.host}/soci/app:none"
    trio.run(_push_image, docker_registry, reference, layers, 1, {})
    log_start = len(docker_registry.log())
    pulled = _pull(containerd, reference)
    assert _outcomes(pulled) == ["applied"] * len(layers), pulled
    log = docker_registry.log()[log_start:]
    # One lookup by the daemon for the whole image, and one by `lazysnap pull` itself, whose
    # parallel download must leave alone the gzip layers an index would make lazy.
    assert log.count("/referrers/") == 2, log[-2000:]


def test_a_v1_indexed_image_pulled_through_the_daemon_downloads_no_gzip_layer_ahead(
    stack: tuple[Daemon, RunningContainerd], docker_registry: RunningRegistry,
) -> None:
    """``--snapshotter-address``: the daemon resolves, so ``lazysnap pull`` looks the v1 index
    up itself before its parallel download would take the layers the daemon serves lazily."""
    daemon, containerd = stack
    own = oci.TarBuilder().dir("own").file("own/text", _words(4 << 20, 7)).tar()
    layers = (oci.gzip_layer(lazy_e2e.base_layer()), oci.gzip_layer(own))
    reference = f"{docker_registry.host}/soci/through-daemon:v1"
    trio.run(_push_image, docker_registry, reference, layers, 1, _ztocs(layers))
    log_start = len(docker_registry.log())
    hosts_dir = containerd.workdir / "certs.d"
    hosts_dir.mkdir(exist_ok=True)
    result = _lazysnap(
        "pull", reference, "--address", str(containerd.address),
        "--namespace", containerd.namespace, "--hosts-dir", str(hosts_dir),
        "--snapshotter-address", str(daemon.address), "--log-level", "info",
    )
    assert result.returncode == 0, result.stderr
    assert _outcomes(result.stdout)[-1] == "remote", result.stdout + daemon.log()[-3000:]
    # The download ahead is what must not start: on loopback a cancelled one may have been
    # answered before the registry logs it, so its own log line tells.
    assert "parallel-prefetch" not in result.stderr, result.stderr[-2000:]
    served, _ = _layer_bytes_served(docker_registry.log()[log_start:], [layers[1].digest])
    assert served < FETCHED_LIMIT * len(layers[1].blob), (
        f"{served} of {len(layers[1].blob)} bytes of a lazily served layer were downloaded"
    )


@pytest.fixture
def stack_background(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    """lazysnap with its default configuration: background fetch on."""
    with lazy_e2e.lazy_stack(short_tmp) as running:
        yield running


def test_background_fetch_verifies_soci_layers_against_their_digests(
    stack_background: tuple[Daemon, RunningContainerd], images: dict[str, Any]
) -> None:
    daemon, containerd = stack_background
    image: SociImage = images["v2"]
    assert _outcomes(_pull(containerd, image.reference)) == ["remote"] * len(image.layers)
    assert _run(containerd, image.reference, "bg", "/bin/cat", "/etc/hello") == (
        lazy_e2e.HELLO.decode()
    )

    def verified() -> set[str]:
        return {
            layer.digest for layer in image.layers
            if re.search(rf"layer fully fetched and verified layer=\S+ digest={layer.digest}",
                         daemon.log())
        }

    deadline = time.monotonic() + 120
    while verified() != {layer.digest for layer in image.layers}:
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.5)
    assert "digest mismatch" not in daemon.log()
