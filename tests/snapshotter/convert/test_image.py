"""``convert_image`` against the in-memory registry: converted blobs, documents, what is pushed
when, and what a failure leaves behind."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import zstandard

from registry import ManifestError, Platform, PlatformNotFoundError, parse_reference
from snapshotter.convert.documents import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    ConvertError,
    TargetFormat,
)
from snapshotter.convert.image import ConvertOptions, ConvertResult, LayerReport, convert_image
from snapshotter.labels import ESTARGZ_TOC_DIGEST
from snapshotter.lazy_formats import classify_layer
from tests.registry.fake_registry import FakeRegistry, digest_of, make_client, oci_error
from tests.support import oci_image as oci

SRC = parse_reference("reg.test/app:1")
DST = parse_reference("reg.test/app:lazy")
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
AMD64 = Platform("linux", "amd64")
TARS = (
    oci.TarBuilder().dir("bin").file("bin/tool", b"\x7fELF" + bytes(range(256)) * 64, 0o755)
    .symlink("bin/sh", "tool").tar(),
    oci.TarBuilder().dir("etc").file("etc/hello", b"hello\n").file("etc/big", b"x" * 300_000)
    .tar(),
)


@dataclass
class SourceImage:
    registry: FakeRegistry
    layers: list[oci.Layer]
    config: dict[str, Any]


def source_image(
    layers: Sequence[oci.Layer] | None = None,
    *,
    media_type: str = DOCKER_MANIFEST,
    layer_media_type: str | None = DOCKER_LAYER,
) -> SourceImage:
    """A docker-typed image (the common case in registries) under reg.test/app:1."""
    fake = FakeRegistry()
    chosen = list(layers or [oci.gzip_layer(tar) for tar in TARS])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in chosen]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": fake.add_blob(config_bytes), "size": len(config_bytes)},
        "layers": [
            {
                "mediaType": layer_media_type or layer.media_type,
                "digest": fake.add_blob(layer.blob),
                "size": len(layer.blob),
                "annotations": {"org.example.note": f"layer {n}", **dict(layer.annotations)},
            }
            for n, layer in enumerate(chosen)
        ],
        "annotations": {"org.opencontainers.image.source": "https://example.test/app"},
    }
    fake.add_manifest(json.dumps(manifest).encode(), media_type, tag="1")
    return SourceImage(fake, chosen, config)


def run_convert(
    fake: FakeRegistry, options: ConvertOptions, destination: Any = DST
) -> tuple[ConvertResult, list[LayerReport]]:
    reports: list[LayerReport] = []

    async def main() -> ConvertResult:
        async with make_client(fake) as client:
            return await convert_image(client, SRC, destination, options, reports.append)

    return trio.run(main), reports


def pushed_manifest(fake: FakeRegistry, tag: str = "lazy") -> dict[str, Any]:
    body, media_type = fake.manifests[tag]
    assert media_type == OCI_MANIFEST
    doc: dict[str, Any] = json.loads(body)
    return doc


def decompressed(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)  # every gzip member, the TOC member included
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def files_of(tar: bytes) -> dict[str, bytes | str]:
    """Regular files (content) and symlinks (target) of a tar, without format extras."""
    found: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive:
            if member.name in ("stargz.index.json", ".prefetch.landmark",
                               ".no.prefetch.landmark"):
                continue
            if member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
            elif member.issym():
                found[member.name] = "-> " + member.linkname
    return found


def uploads(fake: FakeRegistry) -> list[httpx.Request]:
    return [r for r in fake.requests if r.method in ("POST", "PUT", "PATCH")]


@pytest.mark.parametrize(
    ("fmt", "media_type"), [("estargz", OCI_LAYER_GZIP), ("zstd:chunked", OCI_LAYER_ZSTD)]
)
def test_every_layer_is_converted_and_the_image_pushed(fmt: TargetFormat, media_type: str) -> None:
    source = source_image()
    result, reports = run_convert(source.registry, ConvertOptions(fmt, AMD64))

    manifest = pushed_manifest(source.registry)
    assert result.digest == digest_of(source.registry.manifests["lazy"][0])
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["annotations"] == {
        "org.opencontainers.image.source": "https://example.test/app"
    }
    config_descriptor = manifest["config"]
    assert config_descriptor["mediaType"] == OCI_CONFIG
    config = json.loads(source.registry.blobs[config_descriptor["digest"]])
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in source.config.items() if k != "rootfs"
    }
    assert [r.number for r in reports] == [1, 2] and all(r.converted for r in reports)
    pairs = zip(manifest["layers"], reports, TARS, strict=True)
    for n, (descriptor, report, tar) in enumerate(pairs):
        assert descriptor["mediaType"] == media_type
        assert descriptor["annotations"]["org.example.note"] == f"layer {n}"
        verdict = classify_layer(descriptor["mediaType"], descriptor["annotations"])
        assert verdict.format == fmt, verdict.reason
        blob = source.registry.blobs[descriptor["digest"]]
        assert len(blob) == descriptor["size"] == report.result.size
        plain = decompressed(blob)
        assert config["rootfs"]["diff_ids"][n] == digest_of(plain) == report.result.diff_id
        assert files_of(plain) == files_of(tar)
        assert report.uploaded
    if fmt == "zstd:chunked":
        # Without prioritized files, zstd:chunked decompresses to the very same tar.
        assert config["rootfs"]["diff_ids"] == source.config["rootfs"]["diff_ids"]


def test_the_manifest_is_pushed_last() -> None:
    source = source_image()
    run_convert(source.registry, ConvertOptions("estargz", AMD64))
    writes = uploads(source.registry)
    assert "/manifests/" in writes[-1].url.path
    assert sum("/manifests/" in w.url.path for w in writes) == 1


def test_prioritized_files_come_first_then_the_landmark() -> None:
    source = source_image()
    options = ConvertOptions("estargz", AMD64, prioritized=("etc/big",))
    run_convert(source.registry, options)
    layers = pushed_manifest(source.registry)["layers"]
    blobs = [source.registry.blobs[d["digest"]] for d in layers]
    names = [tarfile.open(fileobj=io.BytesIO(decompressed(blob))).getnames() for blob in blobs]
    assert names[1][:3] == ["etc", "etc/big", ".prefetch.landmark"]
    assert names[0][0] == ".no.prefetch.landmark", "a layer without the file is not prioritized"


def test_layers_already_in_the_format_are_kept_byte_for_byte() -> None:
    lazy = oci.seekable_layer(TARS[0], "estargz")
    source = source_image([lazy, oci.gzip_layer(TARS[1])], layer_media_type=None)
    _result, reports = run_convert(source.registry, ConvertOptions("estargz", AMD64))
    layers = pushed_manifest(source.registry)["layers"]
    assert [r.converted for r in reports] == [False, True]
    assert layers[0]["digest"] == lazy.digest
    assert layers[0]["annotations"][ESTARGZ_TOC_DIGEST] == dict(lazy.annotations)[
        ESTARGZ_TOC_DIGEST
    ]
    assert not reports[0].uploaded, "one registry, one repository: the blob is already there"
    config_digest = pushed_manifest(source.registry)["config"]["digest"]
    config = json.loads(source.registry.blobs[config_digest])
    assert config["rootfs"]["diff_ids"][0] == lazy.diff_id


def test_an_eStargz_layer_converted_to_zstd_chunked_loses_its_stale_toc_digest() -> None:
    lazy = oci.seekable_layer(TARS[0], "estargz")
    source = source_image([lazy], layer_media_type=None)
    _result, reports = run_convert(source.registry, ConvertOptions("zstd:chunked", AMD64))
    annotations = pushed_manifest(source.registry)["layers"][0]["annotations"]
    assert reports[0].converted
    assert annotations[ESTARGZ_TOC_DIGEST] != dict(lazy.annotations)[ESTARGZ_TOC_DIGEST]
    assert classify_layer(OCI_LAYER_ZSTD, annotations).format == "zstd:chunked"


def test_a_second_run_uploads_nothing_but_the_manifest() -> None:
    source = source_image()
    run_convert(source.registry, ConvertOptions("estargz", AMD64))
    first = pushed_manifest(source.registry)
    source.registry.requests.clear()
    _result, reports = run_convert(source.registry, ConvertOptions("estargz", AMD64))
    assert not any(r.uploaded for r in reports)
    assert pushed_manifest(source.registry) == first, "conversion is deterministic"
    assert [w.url.path for w in uploads(source.registry)] == ["/v2/app/manifests/lazy"]


def test_an_index_converts_the_chosen_platform() -> None:
    source = source_image()
    arm = source_image([oci.gzip_layer(TARS[1])])
    registry = source.registry
    registry.blobs.update(arm.registry.blobs)
    amd_body, amd_type = registry.manifests["1"]
    arm_body, _ = arm.registry.manifests["1"]
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": amd_type, "digest": registry.add_manifest(arm_body, amd_type),
             "size": len(arm_body), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": amd_type, "digest": registry.add_manifest(amd_body, amd_type),
             "size": len(amd_body), "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    registry.add_manifest(json.dumps(index).encode(), OCI_INDEX, tag="1")
    result, reports = run_convert(registry, ConvertOptions("estargz", AMD64))
    assert [p.platform for p in result.platforms] == [AMD64]
    assert len(reports) == 2 and len(pushed_manifest(registry)["layers"]) == 2
    with pytest.raises(PlatformNotFoundError, match="available: linux/arm64, linux/amd64"):
        run_convert(registry, ConvertOptions("estargz", Platform("linux", "s390x")))

    # Every platform: one converted image per real platform, then a new index under the tag.
    attestation = registry.add_manifest(arm_body, amd_type)
    index["manifests"].append(
        {"mediaType": amd_type, "digest": attestation, "size": len(arm_body),
         "platform": {"os": "unknown", "architecture": "unknown"}}
    )
    registry.add_manifest(json.dumps(index).encode(), OCI_INDEX, tag="1")
    registry.requests.clear()
    result, reports = run_convert(registry, ConvertOptions("estargz", all_platforms=True))
    pushed_index, media_type = registry.manifests["lazy"]
    assert media_type == OCI_INDEX and result.digest == digest_of(pushed_index)
    entries = json.loads(pushed_index)["manifests"]
    assert [e["platform"] for e in entries] == [
        {"os": "linux", "architecture": "arm64"}, {"os": "linux", "architecture": "amd64"}
    ]
    assert [len(json.loads(registry.manifests[e["digest"]][0])["layers"]) for e in entries] == [
        1, 2
    ]
    assert [p.platform for p in result.platforms] == [
        Platform("linux", "arm64"), Platform("linux", "amd64")
    ]
    manifest_puts = [w.url.path for w in uploads(registry) if "/manifests/" in w.url.path]
    assert manifest_puts[-1] == "/v2/app/manifests/lazy", "the tag is written last"
    assert all(path.endswith(e["digest"]) for path, e in zip(manifest_puts, entries, strict=False))


def test_an_unsupported_layer_fails_before_anything_is_downloaded_or_pushed() -> None:
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    source = source_image(layer_media_type=foreign)
    with pytest.raises(ConvertError, match="unsupported layer media type"):
        run_convert(source.registry, ConvertOptions("estargz", AMD64))
    layer_digests = {layer.digest for layer in source.layers}
    touched = {r.url.path.rsplit("/", 1)[-1] for r in source.registry.requests}
    assert not touched & layer_digests
    assert uploads(source.registry) == []


def test_a_failure_midway_leaves_no_tag() -> None:
    source = source_image()
    second = source.layers[1].digest

    def broken_second_layer(request: httpx.Request) -> httpx.Response | None:
        if request.method == "GET" and request.url.path.endswith(second):
            return oci_error(404, "BLOB_UNKNOWN", "gone")
        return None

    source.registry.faults.extend([broken_second_layer] * 50)
    with pytest.raises(Exception, match="BLOB_UNKNOWN"):
        run_convert(source.registry, ConvertOptions("estargz", AMD64))
    assert "lazy" not in source.registry.manifests
    assert not any("/manifests/" in w.url.path for w in uploads(source.registry))


def test_a_corrupt_layer_is_a_convert_error() -> None:
    broken = oci.Layer(blob=gzip.compress(b"this is not a tar" * 100), diff_id=oci.sha256(b""))
    source = source_image([broken])
    with pytest.raises(ConvertError, match=f"layer {broken.digest}: cannot convert"):
        run_convert(source.registry, ConvertOptions("estargz", AMD64))
    assert "lazy" not in source.registry.manifests


def test_a_destination_digest_is_refused() -> None:
    source = source_image()
    pinned = parse_reference("reg.test/app@sha256:" + "0" * 64)
    with pytest.raises(ConvertError, match="must be a tag"):
        run_convert(source.registry, ConvertOptions(), pinned)


def test_a_config_that_disagrees_with_the_manifest_is_refused() -> None:
    source = source_image()
    body, media_type = source.registry.manifests["1"]
    doc = json.loads(body)
    doc["layers"] = doc["layers"][:1]
    source.registry.add_manifest(json.dumps(doc).encode(), media_type, tag="1")
    with pytest.raises(ConvertError, match="config lists 2 diff IDs for a manifest of 1 layers"):
        run_convert(source.registry, ConvertOptions("estargz", AMD64))


def test_a_source_that_is_not_an_image_is_a_registry_error() -> None:
    fake = FakeRegistry()
    thing = "application/x-thing"
    fake.add_manifest(json.dumps({"schemaVersion": 2, "mediaType": thing}).encode(), thing, tag="1")
    with pytest.raises(ManifestError):
        run_convert(fake, ConvertOptions("estargz", AMD64))
