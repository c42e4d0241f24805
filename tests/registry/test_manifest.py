from __future__ import annotations

import json

import pytest

from registry import (
    Index,
    Manifest,
    ManifestError,
    Platform,
    PlatformNotFoundError,
    parse_manifest,
    parse_platform,
    select_manifest,
)
from registry.errors import DigestMismatchError
from registry.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    host_platform,
    sha256_digest,
    verify_digest,
)

SHA = "sha256:" + "1" * 64
SHA2 = "sha256:" + "2" * 64


def manifest_doc(media_type: str | None = OCI_MANIFEST) -> dict[str, object]:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": SHA,
            "size": 7,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": SHA2,
                "size": 1234,
                "annotations": {"containerd.io/snapshot/stargz/toc.digest": SHA},
            }
        ],
    }
    if media_type:
        doc["mediaType"] = media_type
    return doc


def entry(
    arch: str, variant: str | None = None, os_name: str = "linux", digest: str = SHA
) -> dict[str, object]:
    platform: dict[str, str] = {"os": os_name, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": 10, "platform": platform}


def test_parse_oci_manifest() -> None:
    parsed = parse_manifest(json.dumps(manifest_doc()).encode())
    assert isinstance(parsed, Manifest)
    (layer,) = parsed.layers
    assert (
        layer.size == 1234 and layer.annotations["containerd.io/snapshot/stargz/toc.digest"] == SHA
    )
    assert parsed.config.digest == SHA


def test_media_type_from_header_or_shape() -> None:
    body = json.dumps(manifest_doc(None)).encode()
    assert parse_manifest(body, DOCKER_MANIFEST + "; charset=utf-8").media_type == DOCKER_MANIFEST
    assert parse_manifest(body).media_type == OCI_MANIFEST
    index = json.dumps({"schemaVersion": 2, "manifests": [entry("amd64")]}).encode()
    parsed = parse_manifest(index)
    assert isinstance(parsed, Index) and parsed.media_type == OCI_INDEX


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"nope", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
        (b'{"mediaType": "text/plain"}', "unsupported manifest media type"),
        (
            json.dumps(
                {**manifest_doc(), "layers": [{"mediaType": "x", "digest": "sha256:1", "size": 1}]}
            ).encode(),
            "needs 64",
        ),
        (
            json.dumps(
                {**manifest_doc(), "layers": [{"mediaType": "x", "digest": SHA, "size": -1}]}
            ).encode(),
            "non-negative",
        ),
        (json.dumps({**manifest_doc(), "annotations": {"a": 1}}).encode(), "annotations"),
        # Found by fuzzing: nesting deeper than Python's recursion limit escaped as RecursionError.
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_bad_manifests(body: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(body)


def test_platform_selection() -> None:
    body = json.dumps(
        {
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                entry("amd64", digest="sha256:" + "a" * 64),
                entry("arm", "v6", digest="sha256:" + "b" * 64),
                entry("arm", "v7", digest="sha256:" + "c" * 64),
                entry("arm64", "v8", digest="sha256:" + "d" * 64),
                entry("amd64", os_name="windows", digest="sha256:" + "e" * 64),
            ],
        }
    ).encode()
    index = parse_manifest(body)
    assert isinstance(index, Index)
    assert select_manifest(index, parse_platform("linux/amd64")).digest == "sha256:" + "a" * 64
    assert select_manifest(index, parse_platform("linux/arm/v7")).digest == "sha256:" + "c" * 64
    assert select_manifest(index, parse_platform("linux/arm")).digest == "sha256:" + "c" * 64
    assert select_manifest(index, parse_platform("linux/aarch64")).digest == "sha256:" + "d" * 64
    assert select_manifest(index, parse_platform("windows/amd64")).digest == "sha256:" + "e" * 64
    with pytest.raises(PlatformNotFoundError, match="linux/s390x"):
        select_manifest(index, parse_platform("linux/s390x"))


def test_parse_platform_errors_and_host() -> None:
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64")
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(ValueError, match="os/arch"):
            parse_platform(bad)
    assert host_platform().os == "linux"


def test_verify_digest() -> None:
    verify_digest(b"abc", sha256_digest(b"abc"))
    with pytest.raises(DigestMismatchError):
        verify_digest(b"abd", sha256_digest(b"abc"))
