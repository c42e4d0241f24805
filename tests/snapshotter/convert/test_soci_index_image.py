"""``index_image`` against the in-memory registry: the zTOCs, the SOCI index v1 and v2 and the
documents around them, what is pushed when, and that no layer blob changes."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from fusefs import EntryKind, parse_ztoc
from registry import DigestMismatchError, Platform, parse_reference
from snapshotter import soci_index as si
from snapshotter.commands.index import parse_size, result_json
from snapshotter.convert.soci import (
    IndexImageError,
    IndexOptions,
    IndexResult,
    LayerIndexReport,
    index_image,
)
from tests.registry.fake_registry import FakeRegistry, digest_of, make_client
from tests.support import oci_image as oci

IMAGE = parse_reference("reg.test/app:1")
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
BIG = random.Random(14).randbytes(300_000)  # incompressible: several 64 KiB spans
TARS = (
    oci.TarBuilder().dir("bin").file("bin/tool", b"\x7fELF" + BIG, 0o755)
    .symlink("bin/sh", "tool").file("bin/empty", b"").tar(),
    oci.TarBuilder().dir("etc").file("etc/hello", b"hello\n").file("etc/big", BIG[::-1]).tar(),
    oci.TarBuilder().file("tiny", b"t").tar(),
)  # fmt: skip
SPAN = 64 * 1024


def add_image(
    fake: FakeRegistry, tars: tuple[bytes, ...] = TARS, *, media_type: str = DOCKER_MANIFEST,
    arch: str = "amd64", tag: str | None = "1",
) -> tuple[bytes, str]:
    """A docker-typed image, as most registries hold them; its manifest body and digest."""
    layers = [oci.gzip_layer(tar) for tar in tars]
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]}})
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": DOCKER_CONFIG, "digest": fake.add_blob(config.encode()),
                   "size": len(config)},
        "layers": [{"mediaType": DOCKER_LAYER, "digest": fake.add_blob(layer.blob),
                    "size": len(layer.blob), "annotations": {"org.example.n": str(n)}}
                   for n, layer in enumerate(layers)],
        "annotations": {"org.example.image": "app"},
    }  # fmt: skip
    body = json.dumps(manifest, indent=1).encode()
    return body, fake.add_manifest(body, media_type, tag)


def run_index(
    fake: FakeRegistry,
    options: IndexOptions,
    image: Any = IMAGE,
    handler: Callable[[httpx.Request], Any] | None = None,
) -> tuple[IndexResult, list[LayerIndexReport]]:
    reports: list[LayerIndexReport] = []

    async def main() -> IndexResult:
        async with make_client(fake, handler=handler) as client:
            return await index_image(client, image, options, reports.append)

    return trio.run(main), reports


def options(**kwargs: Any) -> IndexOptions:
    base: dict[str, Any] = {"platform": AMD64, "min_layer_size": 1000, "span_size": SPAN}
    return IndexOptions(**{**base, **kwargs})


def writes(fake: FakeRegistry) -> list[str]:
    """What was written, in order: ``blob`` or ``manifest <tag-or-digest>``."""
    found = []
    for request in fake.requests:
        if request.method == "PUT" and "/manifests/" in request.url.path:
            found.append("manifest " + request.url.path.rsplit("/", 1)[1])
        elif request.method == "PUT":
            found.append("blob")
    return found


def regular_files(tar: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {m.name: m.size for m in archive if m.isfile()}


def ztoc_regular_files(data: bytes, blob: bytes, digest: str) -> dict[str, int]:
    layer = parse_ztoc(data, blob_size=len(blob), ztoc_digest=digest)
    index = layer.index
    found = {}
    for entry in range(index.entry_count):
        attr = index.attr(entry)
        if attr.kind == EntryKind.REG:
            found[index.path(entry).lstrip("/")] = attr.size
    return found


def test_v2_indexes_each_big_gzip_layer_and_tags_a_soci_enabled_image() -> None:
    fake = FakeRegistry()
    manifest_body, manifest_digest = add_image(fake)
    blobs_before = dict(fake.blobs)
    result, reports = run_index(fake, options())

    # Layers 1 and 2 are indexed, the 1-file layer is under the minimum.
    assert [r.number for r in reports] == [1, 2, 3]
    assert [r.ztoc is not None for r in reports] == [True, True, False]
    assert "under the minimum" in (reports[2].skip_reason or "")
    # No blob that was there changed, and the new ones are the zTOCs and the empty config.
    assert all(fake.blobs[d] == data for d, data in blobs_before.items())
    original = json.loads(manifest_body)
    index = si.parse(fake.manifests[result.index_digest][0])
    assert fake.manifests[result.index_digest][1] == si.OCI_MANIFEST
    assert index.version == 2 and index.subject is None and index.build_tool == "lazysnap"
    assert fake.blobs[si.EMPTY_CONFIG_DIGEST] == b"{}"
    for report, tar, descriptor in zip(reports[:2], TARS, original["layers"], strict=False):
        ztoc = index.ztoc_for(descriptor["digest"])
        assert ztoc is not None and report.ztoc is not None
        assert (ztoc.digest, ztoc.layer_media_type, ztoc.span_size) == (
            report.ztoc.digest, DOCKER_LAYER, SPAN
        )
        blob = fake.blobs[descriptor["digest"]]
        assert ztoc_regular_files(fake.blobs[ztoc.digest], blob, ztoc.digest) == regular_files(tar)
    assert reports[0].ztoc is not None and reports[0].ztoc.spans > 1

    # The tag names an image index: the annotated manifest, then the SOCI index.
    body, media_type = fake.manifests["1"]
    assert media_type == si.OCI_INDEX and result.image_digest == digest_of(body)
    image_index = json.loads(body)
    image_entry, soci_entry = image_index["manifests"]
    assert image_entry["platform"] == soci_entry["platform"] == {"architecture": "amd64",
                                                                 "os": "linux"}
    assert soci_entry == {
        "mediaType": si.OCI_MANIFEST, "digest": result.index_digest,
        "size": len(fake.manifests[result.index_digest][0]),
        "annotations": {si.IMAGE_MANIFEST_DIGEST: image_entry["digest"]},
        "platform": soci_entry["platform"], "artifactType": si.SOCI_INDEX_V2,
    }  # fmt: skip
    annotated = json.loads(fake.manifests[image_entry["digest"]][0])
    assert annotated["mediaType"] == si.OCI_MANIFEST
    assert annotated["annotations"] == {"org.example.image": "app",
                                        si.IMAGE_INDEX_DIGEST: result.index_digest}
    assert image_entry["annotations"] == annotated["annotations"]
    assert annotated["layers"] == original["layers"], "layer descriptors are kept as they were"
    assert annotated["config"] == {**original["config"], "mediaType": si_oci_config()}
    assert result.manifest_digest == manifest_digest
    # The tag is written last, after everything it names.
    assert writes(fake)[-1] == "manifest 1"
    assert writes(fake)[-3:-1] == [f"manifest {result.index_digest}",
                                   f"manifest {result.enabled_manifest_digest}"]


def si_oci_config() -> str:
    return "application/vnd.oci.image.config.v1+json"


def index_of(fake: FakeRegistry, entries: list[tuple[str, int, str]]) -> str:
    body = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": d, "size": s,
                       "platform": {"architecture": a, "os": "linux"}} for d, s, a in entries],
    }).encode()  # fmt: skip
    return fake.add_manifest(body, "application/vnd.docker.distribution.manifest.list.v2+json",
                             "1")  # fmt: skip


def test_v2_from_an_index_retypes_other_platforms_and_a_rerun_replaces_the_soci_entry() -> None:
    fake = FakeRegistry()
    amd_body, amd = add_image(fake, tag=None)
    arm_body, arm = add_image(fake, TARS[1:], arch="arm64", tag=None)
    index_of(fake, [(amd, len(amd_body), "amd64"), (arm, len(arm_body), "arm64")])
    first, _ = run_index(fake, options(platform=ARM64))
    entries = json.loads(fake.manifests["1"][0])["manifests"]
    assert [e["digest"] for e in entries][1:] == [first.enabled_manifest_digest,
                                                  first.index_digest]  # fmt: skip
    # The other platform is typed OCI as soci does, its layers and config blob unchanged.
    other = entries[0]
    assert other["mediaType"] == si.OCI_MANIFEST and other["digest"] != amd
    assert other["platform"] == {"architecture": "amd64", "os": "linux"}
    retyped = json.loads(fake.manifests[other["digest"]][0])
    original = json.loads(amd_body)
    assert retyped["mediaType"] == si.OCI_MANIFEST
    assert retyped["layers"] == original["layers"]
    assert retyped["config"]["digest"] == original["config"]["digest"]
    assert other["size"] == len(fake.manifests[other["digest"]][0])
    # Indexing the SOCI-enabled image again (another span size) replaces its SOCI index.
    second, _ = run_index(fake, options(platform=ARM64, span_size=2 * SPAN))
    assert second.manifest_digest == first.enabled_manifest_digest
    assert second.index_digest != first.index_digest
    entries = json.loads(fake.manifests["1"][0])["manifests"]
    assert [e["digest"] for e in entries] == [other["digest"], second.enabled_manifest_digest,
                                              second.index_digest]  # fmt: skip
    annotated = json.loads(fake.manifests[second.enabled_manifest_digest or ""][0])
    assert annotated["annotations"][si.IMAGE_INDEX_DIGEST] == second.index_digest


def test_v2_under_another_tag_leaves_the_image_tag_alone() -> None:
    fake = FakeRegistry()
    body, _ = add_image(fake)
    result, _ = run_index(fake, options(tag="1-soci"))
    assert fake.manifests["1"][0] == body
    assert str(result.tagged) == "reg.test/app:1-soci"
    assert json.loads(fake.manifests["1-soci"][0])["mediaType"] == si.OCI_INDEX


def test_v1_is_a_referrer_listed_under_the_referrers_tag_without_the_api() -> None:
    fake = FakeRegistry()
    body, manifest_digest = add_image(fake)
    other = {"mediaType": si.OCI_MANIFEST, "digest": "sha256:" + "9" * 64, "size": 9,
             "artifactType": "application/example"}  # fmt: skip
    tag = "sha256-" + manifest_digest.removeprefix("sha256:")
    fake.add_manifest(json.dumps({"schemaVersion": 2, "mediaType": si.OCI_INDEX,
                                  "manifests": [other]}).encode(), si.OCI_INDEX, tag)  # fmt: skip
    result, _ = run_index(fake, options(version=1))
    assert fake.manifests["1"][0] == body, "v1 leaves the image's tag alone"
    index = si.parse(fake.manifests[result.index_digest][0])
    assert index.version == 1
    assert index.subject == si.Subject(DOCKER_MANIFEST, manifest_digest, len(body))
    assert (result.referrers, result.referrers_tag) == ("tag", tag)
    listing = json.loads(fake.manifests[tag][0])
    assert listing["manifests"] == [other, {
        "mediaType": si.OCI_MANIFEST, "digest": result.index_digest,
        "size": len(fake.manifests[result.index_digest][0]),
        "annotations": {si.BUILD_TOOL: "lazysnap"}, "artifactType": si.SOCI_INDEX_V1,
    }]  # fmt: skip
    # The same index again is listed once.
    run_index(fake, options(version=1))
    assert len(json.loads(fake.manifests[tag][0])["manifests"]) == 2


def test_v1_on_a_registry_with_the_referrers_api_writes_no_tag() -> None:
    fake = FakeRegistry()
    add_image(fake)

    async def with_api(request: httpx.Request) -> httpx.Response:
        if "/referrers/" in request.url.path:
            return httpx.Response(200, json={"schemaVersion": 2, "manifests": []},
                                  headers={"Content-Type": si.OCI_INDEX})  # fmt: skip
        return await fake.handle(request)

    result, _ = run_index(fake, options(version=1), handler=with_api)
    assert (result.referrers, result.referrers_tag) == ("api", None)
    assert not any(tag.startswith("sha256-") for tag in fake.manifests)


def test_a_layer_whose_blob_does_not_match_its_digest_stops_before_any_tag() -> None:
    fake = FakeRegistry()
    body, _ = add_image(fake)
    first_layer = json.loads(body)["layers"][0]["digest"]
    changed = bytearray(fake.blobs[first_layer])
    changed[len(changed) // 2] ^= 1
    fake.blobs[first_layer] = bytes(changed)
    with pytest.raises(DigestMismatchError):
        run_index(fake, options())
    assert fake.manifests["1"][0] == body
    assert not any(w.startswith("manifest") for w in writes(fake))


def test_nothing_to_index_is_an_error_and_pushes_nothing() -> None:
    fake = FakeRegistry()
    add_image(fake)
    with pytest.raises(IndexImageError, match="no layer to index"):
        run_index(fake, options(min_layer_size=10**9))
    assert writes(fake) == []


def test_a_v2_index_of_a_digest_reference_needs_a_tag() -> None:
    fake = FakeRegistry()
    _, digest = add_image(fake)
    with pytest.raises(IndexImageError, match="--tag"):
        run_index(fake, options(), image=parse_reference(f"reg.test/app@{digest}"))
    result, _ = run_index(fake, options(tag="soci"),
                          image=parse_reference(f"reg.test/app@{digest}"))  # fmt: skip
    assert str(result.tagged) == "reg.test/app:soci"


def test_json_report_names_every_layer() -> None:
    fake = FakeRegistry()
    add_image(fake)
    result, _ = run_index(fake, options())
    doc = result_json(result)
    assert doc["sociIndex"]["digest"] == result.index_digest
    assert [("ztoc" in layer, "skipped" in layer) for layer in doc["layers"]] == [
        (True, False), (True, False), (False, True)
    ]
    json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "size"),
    [("10MB", 10_000_000), ("4MiB", 4 << 20), ("4194304", 4 << 20), ("1 kib", 1024)],
)
def test_sizes_on_the_command_line(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "1.5MB", "4 MiBs"])
def test_bad_sizes_are_refused(text: str) -> None:
    import argparse  # noqa: PLC0415

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_a_bare_manifest_whose_config_names_no_platform_is_an_index_error() -> None:
    fake = FakeRegistry()
    body, _ = add_image(fake, arch="")
    with pytest.raises(IndexImageError, match="os and architecture"):
        run_index(fake, options(platform=None))
    assert fake.manifests["1"][0] == body
