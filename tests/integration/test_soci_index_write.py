"""``lazysnap index`` against the real docker-registry (distribution 2.8, which has no
referrers API): every zTOC read back holds its layer's file table, the SOCI index documents
read by a reader written from soci's schema alone, and no layer blob changes."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fusefs import EntryKind, parse_ztoc
from tests.support import oci_image as oci
from tests.support.containerd import containerd_available, run_containerd
from tests.support.daemon import running_daemon
from tests.support.docker_registry import RunningRegistry

pytestmark = [pytest.mark.registry, pytest.mark.slow]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}"
SPAN = 64 * 1024


def _lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def _get(registry: RunningRegistry, path: str) -> bytes:
    request = urllib.request.Request(f"{registry.url}/v2/{path}", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(request, timeout=30) as answer:
        body: bytes = answer.read()
    return body


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _regular_files(tar: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {m.name: m.size for m in archive if m.isfile()}


def _ztoc_files(data: bytes, blob: bytes, digest: str) -> dict[str, int]:
    layer = parse_ztoc(data, blob_size=len(blob), ztoc_digest=digest)
    found = {}
    for entry in range(layer.index.entry_count):
        attr = layer.index.attr(entry)
        if attr.kind == EntryKind.REG:
            found[layer.index.path(entry).lstrip("/")] = attr.size
    return found


def read_soci_index(body: bytes) -> dict[str, Any]:
    """An independent reader, from soci's docs alone: an OCI image manifest whose config is
    the empty JSON object typed with the SOCI artifact type, and one ``application/
    octet-stream`` "layer" per zTOC, naming the image layer it indexes. Returns the artifact
    type, the subject (or None) and the zTOCs by layer digest."""
    doc = json.loads(body)
    assert set(doc) <= {"schemaVersion", "mediaType", "config", "layers", "subject",
                        "annotations"}, doc  # fmt: skip
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_MANIFEST
    config = doc["config"]
    assert config["digest"] == _sha256(b"{}") and config["size"] == 2
    assert config["mediaType"] in ("application/vnd.amazon.soci.index.v1+json",
                                   "application/vnd.amazon.soci.index.v2+json")  # fmt: skip
    ztocs: dict[str, dict[str, Any]] = {}
    for layer in doc["layers"]:
        assert set(layer) == {"mediaType", "digest", "size", "annotations"}, layer
        assert layer["mediaType"] == "application/octet-stream"
        notes = layer["annotations"]
        assert set(notes) <= {"com.amazon.soci.image-layer-digest",
                              "com.amazon.soci.image-layer-mediaType",
                              "com.amazon.soci.span-size"}, notes  # fmt: skip
        assert notes["com.amazon.soci.image-layer-mediaType"].endswith("tar+gzip")
        assert notes["com.amazon.soci.image-layer-digest"] not in ztocs
        ztocs[notes["com.amazon.soci.image-layer-digest"]] = layer
    return {"artifactType": config["mediaType"], "subject": doc.get("subject"),
            "ztocs": ztocs, "annotations": doc.get("annotations", {})}  # fmt: skip


def _push_image(tmp_path: Path, registry: RunningRegistry, tag: str) -> list[tuple[oci.Layer, bytes]]:
    rng = random.Random(14)
    tars = [
        oci.busybox_tar(),
        oci.TarBuilder().dir("data").file("data/noise", rng.randbytes(400_000))
        .file("data/zeros", bytes(2_000_000)).file("data/empty", b"").dir("data/sub")
        .file("data/sub/text", b"soci\n" * 10_000).symlink("data/link", "noise").tar(),
        oci.TarBuilder().dir("etc").file("etc/hello", b"hi\n").tar(),
    ]  # fmt: skip
    layers = [oci.gzip_layer(tar) for tar in tars]
    oci.write_layout(tmp_path / "layout", layers, tag=tag)
    oci.push_layout(tmp_path / "layout", tag, f"{registry.host}/test/soci:{tag}")
    return list(zip(layers, tars, strict=True))


def _check_ztocs(
    registry: RunningRegistry, index: dict[str, Any], pushed: list[tuple[oci.Layer, bytes]],
    min_size: int,
) -> None:
    expected = {layer.digest for layer, _ in pushed if len(layer.blob) >= min_size}
    assert set(index["ztocs"]) == expected
    for layer, tar in pushed:
        descriptor = index["ztocs"].get(layer.digest)
        if descriptor is None:
            continue
        data = _get(registry, f"test/soci/blobs/{descriptor['digest']}")
        assert _sha256(data) == descriptor["digest"] and len(data) == descriptor["size"]
        blob = _get(registry, f"test/soci/blobs/{layer.digest}")
        assert blob == layer.blob, "the layer blob is unchanged"
        assert _ztoc_files(data, blob, descriptor["digest"]) == _regular_files(tar)


def test_v2_index_makes_a_soci_enabled_image(
    docker_registry: RunningRegistry, tmp_path: Path
) -> None:
    pushed = _push_image(tmp_path, docker_registry, "v2")
    min_size = 20_000
    result = _lazysnap("index", f"{docker_registry.host}/test/soci:v2", "--json",
                       "--min-layer-size", str(min_size), "--span-size", "64KiB")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == 2
    assert [("ztoc" in layer) for layer in report["layers"]] == [True, True, False]
    top = json.loads(_get(docker_registry, "test/soci/manifests/v2"))
    assert top["mediaType"] == OCI_INDEX
    image_entry, soci_entry = top["manifests"]
    assert soci_entry["artifactType"] == "application/vnd.amazon.soci.index.v2+json"
    assert image_entry["platform"] == soci_entry["platform"]
    manifest = json.loads(_get(docker_registry, f"test/soci/manifests/{image_entry['digest']}"))
    assert manifest["annotations"]["com.amazon.soci.index-digest"] == soci_entry["digest"]
    assert [layer["digest"] for layer in manifest["layers"]] == [
        layer.digest for layer, _ in pushed
    ]
    body = _get(docker_registry, f"test/soci/manifests/{soci_entry['digest']}")
    assert _sha256(body) == soci_entry["digest"] == report["sociIndex"]["digest"]
    index = read_soci_index(body)
    assert index["artifactType"].endswith("v2+json") and index["subject"] is None
    _check_ztocs(docker_registry, index, pushed, min_size)


def test_v1_index_is_listed_under_the_referrers_tag(
    docker_registry: RunningRegistry, tmp_path: Path
) -> None:
    pushed = _push_image(tmp_path, docker_registry, "v1")
    before = _get(docker_registry, "test/soci/manifests/v1")
    result = _lazysnap("index", f"{docker_registry.host}/test/soci:v1", "--v1", "--json",
                       "--min-layer-size", "0", "--span-size", "64KiB")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["referrers"] == "tag", "distribution 2.8 has no referrers API"
    assert _get(docker_registry, "test/soci/manifests/v1") == before, "the tag is unchanged"
    subject = _sha256(before)
    listing = json.loads(_get(docker_registry, f"test/soci/manifests/{report['referrersTag']}"))
    assert report["referrersTag"] == subject.replace(":", "-")
    (entry,) = listing["manifests"]
    assert entry["artifactType"] == "application/vnd.amazon.soci.index.v1+json"
    body = _get(docker_registry, f"test/soci/manifests/{entry['digest']}")
    index = read_soci_index(body)
    assert index["subject"] == {"mediaType": OCI_MANIFEST, "digest": subject,
                                "size": len(before)}  # fmt: skip
    _check_ztocs(docker_registry, index, pushed, 0)


def test_an_image_that_does_not_exist_is_one_line_and_exit_1(
    docker_registry: RunningRegistry,
) -> None:
    result = _lazysnap("index", f"{docker_registry.host}/test/soci:nope")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazysnap index: "), result.stderr
    try:
        _get(docker_registry, "test/soci/manifests/nope")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


def test_a_soci_enabled_image_runs_through_containerd_and_lazily_through_lazysnap(
    docker_registry: RunningRegistry, short_tmp: Path
) -> None:
    """The image index now lists the SOCI index with the image's platform: containerd and
    ``lazysnap pull`` must still pick the image, not the index, and run it; ``lazysnap pull``
    serves every layer ``lazysnap index`` indexed lazily, through the index it wrote."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    _push_image(short_tmp / "img", docker_registry, "run")
    reference = f"{docker_registry.host}/test/soci:run"
    indexed = _lazysnap("index", reference, "--min-layer-size", "0", "--span-size", "64KiB")
    assert indexed.returncode == 0, indexed.stderr
    with running_daemon(short_tmp / "d") as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        containerd.ctr("image", "pull", "--plain-http", reference)
        ran = containerd.ctr("run", "--rm", reference, "c1", "/bin/cat", "/etc/hello")
        assert ran.stdout == "hi\n"
        containerd.ctr("image", "rm", reference)
        hosts_dir = containerd.workdir / "certs.d"
        pulled = subprocess.run(
            [sys.executable, "-m", "snapshotter.cli", "pull", reference,
             "--address", str(containerd.address), "--namespace", containerd.namespace,
             "--hosts-dir", str(hosts_dir), "--snapshotter-address", str(daemon.address)],
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
        outcomes = [line.split()[3] for line in pulled.stdout.splitlines()
                    if line.startswith("layer ")]  # fmt: skip
        assert outcomes == ["remote"] * 3, pulled.stdout + daemon.log()[-3000:]
        ran = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference, "c2",
                             "/bin/sh", "-c", "cat /etc/hello; md5sum /data/noise")  # fmt: skip
        expected = hashlib.md5(random.Random(14).randbytes(400_000)).hexdigest()
        assert ran.stdout == f"hi\n{expected}  /data/noise\n"
