"""`lazysnap pull` and `lazysnap unpack` against a real containerd 1.6 with lazysnap as a proxy
snapshotter: layers arrive with CRI's per-layer labels, and the images run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter import labels as L
from snapshotter._proto import snapshots_pb2
from snapshotter.client.chain import chain_ids
from snapshotter.labels import MEDIA_TYPE_LABEL
from tests.integration.conftest import PushedImage
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.ports import free_port

pytestmark = [pytest.mark.root, pytest.mark.containerd, pytest.mark.registry, pytest.mark.slow]

CRI_LABELS = (L.CRI_IMAGE_REF, L.CRI_LAYER_DIGEST, L.CRI_MANIFEST_DIGEST, L.CRI_IMAGE_LAYERS)


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    with running_daemon(short_tmp / "d") as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        yield daemon, containerd


def _lazysnap(
    command: str, containerd: RunningContainerd, image: str, *extra: str, address: Path | None = None
) -> subprocess.CompletedProcess[str]:
    hosts_dir = containerd.workdir / "certs.d"  # empty: registries get containerd's defaults
    hosts_dir.mkdir(exist_ok=True)
    args = [
        sys.executable, "-m", "snapshotter.cli", command, image,
        "--address", str(address or containerd.address), "--namespace", containerd.namespace,
        *(["--hosts-dir", str(hosts_dir)] if command == "pull" or "--fetch" in extra else []),
        *extra,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _chains(image: PushedImage) -> list[str]:
    return chain_ids([layer.diff_id for layer in image.layers])


def _ctr_info(containerd: RunningContainerd, chain_id: str) -> dict[str, object] | None:
    result = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "info", chain_id, check=False)
    if result.returncode != 0:
        assert "not found" in result.stderr, result.stderr
        return None
    info: dict[str, object] = json.loads(result.stdout)
    return info


def _labels(info: dict[str, object] | None) -> dict[str, str]:
    assert info is not None
    labels = info.get("Labels") or {}
    assert isinstance(labels, dict)
    return labels


def _expected_cri_labels(image: PushedImage, number: int) -> dict[str, str]:
    digests = [layer.digest for layer in image.layers]
    return {
        L.CRI_IMAGE_REF: image.reference,
        L.CRI_LAYER_DIGEST: digests[number],
        L.CRI_MANIFEST_DIGEST: image.manifest_digest,
        L.CRI_IMAGE_LAYERS: ",".join(digests[number:]),
    }


def _leases(containerd: RunningContainerd) -> list[str]:
    return containerd.ctr("leases", "ls", "-q").stdout.split()


def _collect_garbage(containerd: RunningContainerd) -> None:
    """Run containerd's GC now: deleting a lease with --sync collects before it answers."""
    containerd.ctr("leases", "create", "--id", "lazysnap-test-gc")
    containerd.ctr("leases", "delete", "--sync", "lazysnap-test-gc")


def _run_cat(containerd: RunningContainerd, image: PushedImage, name: str) -> str:
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", image.reference, name, "/bin/cat", "/etc/hello"
    )
    return result.stdout


def test_pull_unpacks_with_cri_labels_and_runs(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    daemon, containerd = stack
    pulled = _lazysnap(
        "pull", containerd, busybox_image.reference, "--snapshotter-address", str(daemon.address)
    )
    assert pulled.returncode == 0, pulled.stderr
    lines = pulled.stdout.splitlines()
    for number, layer in enumerate(busybox_image.layers, start=1):
        # Until the daemon serves layers remotely, every layer takes the fallback path.
        assert any(
            line.startswith(f"layer {number}/2 {layer.digest} applied") for line in lines
        ), pulled.stdout
    assert busybox_image.reference in containerd.ctr("images", "ls", "-q").stdout.split()
    # The GC labels keep everything once our lease is gone: image -> manifest -> config ->
    # top snapshot -> its parent.
    _collect_garbage(containerd)
    assert _run_cat(containerd, busybox_image, "c1") == "hello from layer two\n"

    chains = _chains(busybox_image)
    for number, chain_id in enumerate(chains):
        labels = _labels(_ctr_info(containerd, chain_id))
        assert {k: labels.get(k) for k in CRI_LABELS} == _expected_cri_labels(busybox_image, number)
        assert labels[L.SNAPSHOT_REF] == chain_id

    # The backend itself got the labels (containerd passes only containerd.io/snapshot/* and
    # snapshot.ref on): the committed snapshot carries the labels of the Commit.
    with daemon.snapshots() as stub:
        infos = [i for reply in stub.List(snapshots_pb2.ListSnapshotsRequest()) for i in reply.info]
    for number, chain_id in enumerate(chains):
        (info,) = [i for i in infos if i.name.endswith("/" + chain_id)]
        assert info.kind == snapshots_pb2.COMMITTED
        expected = {
            **_expected_cri_labels(busybox_image, number),
            L.SNAPSHOT_REF: chain_id,
            # lazysnap's unpacker also forwards the media type, which CRI does not.
            MEDIA_TYPE_LABEL: busybox_image.layers[number].media_type,
        }
        assert dict(info.labels) == expected

    # The layer blobs carry their diff ID, the config names the top snapshot for the GC.
    content = containerd.ctr("content", "ls").stdout
    for layer in busybox_image.layers:
        row = next(line for line in content.splitlines() if line.startswith(layer.digest))
        assert f"{L.UNCOMPRESSED}={layer.diff_id}" in row
    assert f"{L.GC_REF_SNAPSHOT_PREFIX}lazysnap={chains[-1]}" in content
    assert _leases(containerd) == []

    # A second pull finds every layer in place.
    again = _lazysnap("pull", containerd, busybox_image.reference)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(" exists ") == 2, again.stdout
    assert _leases(containerd) == []


def test_unpack_image_pulled_for_overlayfs(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    _daemon, containerd = stack
    containerd.ctr("image", "pull", "--plain-http", busybox_image.reference)  # overlayfs
    chains = _chains(busybox_image)
    assert [_ctr_info(containerd, chain_id) for chain_id in chains] == [None, None]

    unpacked = _lazysnap("unpack", containerd, busybox_image.reference)
    assert unpacked.returncode == 0, unpacked.stderr
    assert "unpacked" in unpacked.stdout.splitlines()[-1]
    for number, chain_id in enumerate(chains):
        labels = _labels(_ctr_info(containerd, chain_id))
        assert {k: labels.get(k) for k in CRI_LABELS} == _expected_cri_labels(busybox_image, number)
    assert _run_cat(containerd, busybox_image, "c2") == "hello from layer two\n"
    assert _leases(containerd) == []


def test_bad_input_fails_with_one_line_and_leaves_nothing(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    _daemon, containerd = stack
    registry_host = busybox_image.reference.split("/")[0]

    def check(result: subprocess.CompletedProcess[str], *words: str) -> None:
        assert result.returncode == 1, (result.stdout, result.stderr)
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 1, result.stderr
        for word in words:
            assert word in errors[0].lower(), errors[0]

    unknown = f"{registry_host}/test/no-such-image:latest"
    check(_lazysnap("pull", containerd, unknown), "lazysnap pull:", "not")
    down = f"127.0.0.1:{free_port()}/test/busybox:latest"
    check(_lazysnap("pull", containerd, down), "lazysnap pull:")
    missing = containerd.workdir / "missing.sock"
    check(
        _lazysnap("pull", containerd, busybox_image.reference, address=missing),
        "does not exist",
    )
    check(_lazysnap("unpack", containerd, unknown), "lazysnap unpack:", "not in containerd")
    check(
        _lazysnap("unpack", containerd, busybox_image.reference, address=missing),
        "does not exist",
    )
    assert containerd.ctr("images", "ls", "-q").stdout.split() == []
    assert _leases(containerd) == []
    assert containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout.splitlines()[1:] == []


def test_pull_failing_midway_leaves_nothing_behind(
    stack: tuple[Daemon, RunningContainerd],
    docker_registry: RunningRegistry,
    busybox_image: PushedImage,
    tmp_path: Path,
) -> None:
    _daemon, containerd = stack
    # The second layer is unique to this image, so the registry can lose it without harm.
    unique = oci.gzip_layer(oci.TarBuilder().file("lost", tmp_path.name.encode()).tar())
    oci.write_layout(tmp_path / "layout", (busybox_image.layers[0], unique))
    reference = f"{docker_registry.host}/test/broken:latest"
    oci.push_layout(tmp_path / "layout", "latest", reference)
    hexdigest = unique.digest.removeprefix("sha256:")
    blob = docker_registry.root / "data/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest
    (blob / "data").unlink()

    failed = _lazysnap("pull", containerd, reference)
    assert failed.returncode == 1, failed.stdout
    (error,) = failed.stderr.strip().splitlines()
    assert error.startswith(f"lazysnap pull: {reference}:") and unique.digest in error
    # The first layer was unpacked before the failure; without an image or a lease nothing
    # references it any more, so containerd's GC takes it.
    assert f"layer 1/2 {busybox_image.layers[0].digest} applied" in failed.stdout
    assert _leases(containerd) == []
    assert containerd.ctr("images", "ls", "-q").stdout.split() == []
    _collect_garbage(containerd)
    assert containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout.splitlines()[1:] == []


@pytest.fixture(scope="module")
def seekable_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> PushedImage:
    """busybox as eStargz, /etc/hello as zstd:chunked, then a plain gzip layer."""
    layers = (
        oci.seekable_layer(oci.busybox_tar(), "estargz", chunk_size=64 << 10),
        oci.seekable_layer(
            oci.TarBuilder().dir("etc").file("etc/hello", b"hello from a lazy layer\n").tar(),
            "zstd:chunked",
        ),
        oci.gzip_layer(oci.TarBuilder().dir("etc").file("etc/plain", b"plain\n").tar()),
    )
    layout = tmp_path_factory.mktemp("pull-seekable-layout")
    digest = oci.write_layout(layout, layers)
    reference = f"{docker_registry.host}/test/pull-seekable:latest"
    oci.push_layout(layout, "latest", reference)
    return PushedImage(reference, layers, digest)


@pytest.mark.fuse
def test_pull_serves_seekable_layers_remotely(
    stack: tuple[Daemon, RunningContainerd], seekable_image: PushedImage
) -> None:
    daemon, containerd = stack
    pulled = _lazysnap("pull", containerd, seekable_image.reference)
    assert pulled.returncode == 0, pulled.stderr + daemon.log()[-3000:]
    outcomes = [line.split()[3] for line in pulled.stdout.splitlines() if line.startswith("layer ")]
    assert outcomes == ["remote", "remote", "applied"], pulled.stdout
    # The first Prepare's cri.image-layers named the others: the second TOC was read meanwhile.
    attached = [line for line in daemon.log().splitlines() if "remote layer attached" in line]
    sources = [line.rsplit("toc=", 1)[1].split('"', 1)[0] for line in attached]
    assert sources == ["read", "read-ahead"], attached
    chains = _chains(seekable_image)
    for number, chain_id in enumerate(chains):
        labels = _labels(_ctr_info(containerd, chain_id))
        assert {k: labels.get(k) for k in CRI_LABELS} == _expected_cri_labels(seekable_image, number)
    # Lazy layers were never downloaded into containerd's content store.
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    assert seekable_image.layers[0].digest not in content
    assert seekable_image.layers[2].digest in content
    _collect_garbage(containerd)
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", seekable_image.reference, "c3",
        "/bin/cat", "/etc/hello", "/etc/plain",
    )
    assert result.stdout == "hello from a lazy layer\nplain\n"
    assert _leases(containerd) == []

    # overlayfs needs the blobs lazysnap never downloaded: an error, unless fetching is allowed.
    refused = _lazysnap("unpack", containerd, seekable_image.reference, "--snapshotter", "overlayfs")
    assert refused.returncode == 1
    assert seekable_image.layers[0].digest in refused.stderr
    assert "not in containerd's content store" in refused.stderr
    fetched = _lazysnap(
        "unpack", containerd, seekable_image.reference, "--snapshotter", "overlayfs", "--fetch"
    )
    assert fetched.returncode == 0, fetched.stderr
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "overlayfs", seekable_image.reference, "c4",
        "/bin/cat", "/etc/hello",
    )
    assert result.stdout == "hello from a lazy layer\n"
    assert _leases(containerd) == []


@pytest.mark.fuse
def test_pull_through_the_daemon_resolves_there_and_reads_the_tocs_ahead(
    stack: tuple[Daemon, RunningContainerd], seekable_image: PushedImage
) -> None:
    daemon, containerd = stack
    pulled = _lazysnap(
        "pull", containerd, seekable_image.reference, "--snapshotter-address", str(daemon.address),
        "--log-level", "info",
    )
    assert pulled.returncode == 0, pulled.stderr + daemon.log()[-3000:]
    outcomes = [line.split()[3] for line in pulled.stdout.splitlines() if line.startswith("layer ")]
    assert outcomes == ["remote", "remote", "applied"], pulled.stdout
    log = daemon.log()
    # The daemon resolved the image (Daemon/Resolve) and, in the same call, started reading the
    # two lazy layers' TOCs; the plain gzip one is not lazy. No separate PrepareAhead came.
    assert f"resolved image={seekable_image.reference} manifest={seekable_image.manifest_digest}" \
        " layers=3 read_ahead=2" in log, log[-3000:]
    assert "prepare-ahead" not in log
    assert "resolved by the daemon" in pulled.stderr and "read_ahead=2" in pulled.stderr
    # Both lazy Prepares used the TOCs read ahead instead of asking the registry.
    attached = [line for line in log.splitlines() if "remote layer attached" in line]
    assert len(attached) == 2 and all("toc=read-ahead" in line for line in attached), attached
    # The plain gzip layer was known not to be lazy: no neighbour read-ahead tried its tail.
    assert "layer TOC not read ahead" not in log, log[-3000:]
    # The gzip layer's blob was fetched by the CLI into containerd's content store.
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    assert seekable_image.layers[2].digest in content
    assert seekable_image.layers[0].digest not in content
    chains = _chains(seekable_image)
    for number, chain_id in enumerate(chains):
        labels = _labels(_ctr_info(containerd, chain_id))
        assert {k: labels.get(k) for k in CRI_LABELS} == _expected_cri_labels(seekable_image, number)
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", seekable_image.reference, "c5",
        "/bin/cat", "/etc/hello", "/etc/plain",
    )
    assert result.stdout == "hello from a lazy layer\nplain\n"
    assert _leases(containerd) == []


@pytest.mark.fuse
def test_pull_through_the_daemon_imports_no_registry_client_before_resolving(
    stack: tuple[Daemon, RunningContainerd], seekable_image: PushedImage
) -> None:
    """The point of Daemon/Resolve: the CLI reaches it without trio, httpx or ``registry``, and
    reads its configuration (``snapshotter.daemon.config``) only once the daemon is at work."""
    daemon, containerd = stack
    hosts_dir = containerd.workdir / "certs.d"
    hosts_dir.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "snapshotter.cli", "pull",
         seekable_image.reference, "--address", str(containerd.address),
         "--namespace", containerd.namespace, "--hosts-dir", str(hosts_dir),
         "--snapshotter-address", str(daemon.address), "--log-level", "debug", "--quiet"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    sent = next(i for i, line in enumerate(lines) if "resolve through the daemon" in line)
    before = [line for line in lines[:sent] if line.startswith("import time:")]
    assert before, "no import lines: was -X importtime honoured?"
    heavy = [line for line in before
             if any(f" {name}" in line.split("|")[-1]
                    for name in ("trio", "httpx", "registry", "snapshotter.daemon.config"))]
    assert heavy == [], heavy


def test_pull_through_the_daemon_reports_a_missing_image_like_a_local_pull(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    daemon, containerd = stack
    registry_host = busybox_image.reference.split("/")[0]
    for missing in (
        f"{registry_host}/test/no-such-image:latest",
        busybox_image.reference.rsplit(":", 1)[0] + ":no-such-tag",
    ):
        local = _lazysnap("pull", containerd, missing)
        through = _lazysnap("pull", containerd, missing, "--snapshotter-address", str(daemon.address))
        assert through.returncode == local.returncode == 1, (through.stdout, through.stderr)
        (error,) = through.stderr.strip().splitlines()
        assert error == local.stderr.strip(), (error, local.stderr)
        assert error.startswith(f"lazysnap pull: {missing}: not found in the registry"), error
    bad = _lazysnap("pull", containerd, "Bad//Name", "--snapshotter-address", str(daemon.address))
    assert bad.returncode == 1
    assert bad.stderr.strip() == _lazysnap("pull", containerd, "Bad//Name").stderr.strip()
    assert containerd.ctr("images", "ls", "-q").stdout.split() == []
    assert _leases(containerd) == []


def test_pull_through_a_daemon_that_cannot_resolve_resolves_locally(
    short_tmp: Path, busybox_image: PushedImage
) -> None:
    """Lazy pulling off: the daemon answers Resolve with UNIMPLEMENTED; the pull goes on as
    before Daemon/Resolve existed (and the layers are simply applied)."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    config = short_tmp / "lazysnap.toml"
    config.write_text("[lazy]\nenabled = false\n")
    with running_daemon(short_tmp / "d", extra_args=["--config", str(config)]) as daemon, \
            run_containerd(short_tmp / "c", daemon.address) as containerd:
        pulled = _lazysnap(
            "pull", containerd, busybox_image.reference,
            "--snapshotter-address", str(daemon.address), "--log-level", "info",
        )
        assert pulled.returncode == 0, pulled.stderr
        assert "cannot resolve; resolving here" in pulled.stderr
        outcomes = [line.split()[3] for line in pulled.stdout.splitlines()
                    if line.startswith("layer ")]
        assert outcomes == ["applied"] * len(busybox_image.layers), pulled.stdout
        assert _run_cat(containerd, busybox_image, "c6") == "hello from layer two\n"


def test_pull_through_a_daemon_that_is_not_there_says_so(
    stack: tuple[Daemon, RunningContainerd], busybox_image: PushedImage
) -> None:
    # The daemon's Status is asked only once the Resolve failed: the message stays the same.
    _daemon, containerd = stack
    missing = containerd.workdir / "nobody-listens.sock"
    result = _lazysnap("pull", containerd, busybox_image.reference,
                       "--snapshotter-address", str(missing))
    assert result.returncode == 1, result.stdout
    (error,) = result.stderr.strip().splitlines()
    assert error.startswith(f"lazysnap pull: lazysnap daemon at {missing} does not answer"), error
