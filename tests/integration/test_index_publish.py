"""``[index] publish`` with only real parts: Debian's containerd 1.6, the docker-registry on
loopback (2.8: no referrers API, so the index is listed under the referrers tag) and the
lazysnap daemon.

A node pulls an unindexed gzip image in full with ``lazysnap pull --snapshotter-address``;
with publishing on, its daemon reads the blobs back from containerd, builds the zTOCs and
pushes a v1 SOCI index. A fresh node (new daemon, new containerd state) then pulls the same
image lazily. With publishing off nothing is pushed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import trio

from fusefs import EntryKind, parse_ztoc
from registry import create_client, parse_reference
from snapshotter import soci_index as si
from tests.integration.test_lazy_end_to_end import HELLO, _lazysnap, _run
from tests.integration.test_soci_end_to_end import _outcomes, _push_image, layers
from tests.support import oci_image as oci
from tests.support._cri_proto import cri_api_pb2 as cri
from tests.support._cri_proto import cri_api_pb2_grpc as cri_grpc
from tests.support.containerd import (
    CriSettings,
    RunningContainerd,
    containerd_available,
    run_containerd,
)
from tests.support.cri import CALL_TIMEOUT
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.marks import full_stack

pytestmark = full_stack()
__all__ = ["layers"]  # the fixture, shared with the SOCI end-to-end tests

SPAN = 1 << 20
PUBLISH_TIMEOUT = 180.0


@contextmanager
def node(workdir: Path, *, publish: bool) -> Iterator[tuple[Daemon, RunningContainerd]]:
    """A daemon (background fetch off, so the registry serves only what is read) and its
    containerd. The daemon reads containerd's content store at the address it will have."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "lazysnap.toml"
    config.write_text(
        "[lazy]\nbackground_fetch = false\n"
        f"[cri]\ncontainerd_address = \"{workdir / 'c' / 'c.sock'}\"\n"
        f"[index]\npublish = {str(publish).lower()}\nmin_layer_size = 0\nspan_size = {SPAN}\n"
    )
    with running_daemon(workdir / "d", extra_args=["--config", str(config)]) as daemon, \
            run_containerd(workdir / "c", daemon.address) as containerd:
        assert containerd.address == workdir / "c" / "c.sock"
        yield daemon, containerd


def _pull(daemon: Daemon, containerd: RunningContainerd, reference: str) -> str:
    hosts_dir = containerd.workdir / "certs.d"  # empty: loopback registries get plain HTTP
    hosts_dir.mkdir(exist_ok=True)
    result = _lazysnap(
        "pull", reference, "--address", str(containerd.address),
        "--namespace", containerd.namespace, "--hosts-dir", str(hosts_dir),
        "--snapshotter-address", str(daemon.address),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def _soci_referrers(reference: str, manifest_digest: str) -> list[bytes]:
    """The v1 SOCI indexes listed for the manifest, fetched from the registry."""
    hosts = Path(tempfile.mkdtemp(prefix="lz-publish-hosts"))
    ref = parse_reference(reference)
    try:
        async with create_client(hosts) as client:
            found = await client.fetch_referrers(ref, manifest_digest, si.SOCI_INDEX_V1)
            return [
                (await client.fetch_manifest(ref, referrer.digest)).content
                for referrer in found.of_type(si.SOCI_INDEX_V1)
            ]
    finally:
        shutil.rmtree(hosts, ignore_errors=True)


async def _fetch_blob(reference: str, digest: str) -> bytes:
    hosts = Path(tempfile.mkdtemp(prefix="lz-publish-hosts"))
    try:
        async with create_client(hosts) as client:
            return await client.fetch_blob(parse_reference(reference), digest,
                                           max_size=64 << 20)
    finally:
        shutil.rmtree(hosts, ignore_errors=True)


def _wait_for_event(daemon: Daemon, pattern: str) -> str:
    deadline = time.monotonic() + PUBLISH_TIMEOUT
    while not re.search(pattern, daemon.log()):
        assert time.monotonic() < deadline, daemon.log()[-4000:]
        time.sleep(0.5)
    return daemon.log()


def test_a_node_publishes_the_index_and_the_next_node_pulls_lazily(
    short_tmp: Path, docker_registry: RunningRegistry, layers: tuple[oci.Layer, ...],
) -> None:
    reference = f"{docker_registry.host}/publish/app:on"
    manifest_digest = trio.run(_push_image, docker_registry, reference, layers, 1, {})
    assert trio.run(_soci_referrers, reference, manifest_digest) == []

    with node(short_tmp / "1", publish=True) as (daemon, containerd):
        pulled = _pull(daemon, containerd, reference)
        assert _outcomes(pulled) == ["applied"] * len(layers), pulled
        log = _wait_for_event(daemon, r"index_publish(ed|_failed|_skipped)")
        assert "index_published" in log, log[-4000:]

    (body,) = trio.run(_soci_referrers, reference, manifest_digest)
    index = si.parse(body)
    assert index.version == 1
    assert index.subject is not None and index.subject.digest == manifest_digest
    assert set(index.ztocs) == {layer.digest for layer in layers}
    for layer in layers:
        ztoc_digest = index.ztocs[layer.digest].digest
        data = trio.run(_fetch_blob, reference, ztoc_digest)
        table = parse_ztoc(data, blob_size=len(layer.blob), ztoc_digest=ztoc_digest).index
        files = {table.path(n).lstrip("/") for n in range(table.entry_count)
                 if table.attr(n).kind == EntryKind.REG}
        assert files, f"zTOC of {layer.digest} lists no file"
    assert index.ztocs[layers[0].digest].span_size == SPAN

    # A fresh node: nothing of the first one's containerd or daemon state.
    with node(short_tmp / "2", publish=True) as (daemon, containerd):
        pulled = _pull(daemon, containerd, reference)
        assert _outcomes(pulled) == ["remote"] * len(layers), pulled + daemon.log()[-3000:]
        assert _run(containerd, reference, "published", "/bin/cat", "/etc/hello") == (
            HELLO.decode()
        )
        assert "index_publish_started" not in daemon.log(), "a lazy pull asks for nothing"


def test_with_publish_off_nothing_is_pushed(
    short_tmp: Path, docker_registry: RunningRegistry, layers: tuple[oci.Layer, ...],
) -> None:
    reference = f"{docker_registry.host}/publish/app:off"
    manifest_digest = trio.run(_push_image, docker_registry, reference, layers, 1, {})
    with node(short_tmp / "1", publish=False) as (daemon, containerd):
        pulled = _pull(daemon, containerd, reference)
        assert _outcomes(pulled) == ["applied"] * len(layers), pulled
        time.sleep(2)  # a job, had one been queued, would have started by now
        assert "index_publish" not in daemon.log()
    assert trio.run(_soci_referrers, reference, manifest_digest) == []


def test_a_pull_through_the_cri_image_service_proxy_publishes_the_index(
    short_tmp: Path, docker_registry: RunningRegistry, layers: tuple[oci.Layer, ...],
) -> None:
    """kubelet runs no ``lazysnap pull``: the proxy's PullImage is what starts the job."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    reference = f"{docker_registry.host}/publish/app:cri"
    manifest_digest = trio.run(_push_image, docker_registry, reference, layers, 1, {})
    work = short_tmp / "cri"
    work.mkdir()
    proxy = work / "d" / "cri.sock"
    config = work / "lazysnap.toml"
    config.write_text(
        "[lazy]\nbackground_fetch = false\n"
        f"[cri]\ncontainerd_address = \"{work / 'c' / 'c.sock'}\"\n"
        f"[index]\npublish = true\nmin_layer_size = 0\nspan_size = {SPAN}\n"
    )
    with running_daemon(work / "d", extra_args=["--config", str(config),
                                                "--cri-image-service", str(proxy)]) as daemon, \
            run_containerd(work / "c", daemon.address,
                           cri=CriSettings(sandbox_image=reference)) as containerd, \
            grpc.insecure_channel(f"unix:{proxy}") as channel:
        assert containerd.address == work / "c" / "c.sock"
        images = cri_grpc.ImageServiceStub(channel)
        images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=reference)),
                         timeout=CALL_TIMEOUT)
        log = _wait_for_event(daemon, r"index_publish(ed|_failed|_skipped|_lookup_failed)")
        assert "index_published" in log, log[-4000:]

    (body,) = trio.run(_soci_referrers, reference, manifest_digest)
    index = si.parse(body)
    assert index.subject is not None and index.subject.digest == manifest_digest
    assert set(index.ztocs) == {layer.digest for layer in layers}
