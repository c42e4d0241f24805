from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.labels import (
    ESTARGZ_TOC_DIGEST,
    LEGACY_ZSTD_CHUNKED_CHECKSUM,
    LEGACY_ZSTD_CHUNKED_POSITION,
    ZSTD_CHUNKED_CHECKSUM,
    ZSTD_CHUNKED_POSITION,
)
from snapshotter.lazy_formats import classify_layer

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
SHA = "sha256:" + "0123456789abcdef" * 4


def test_estargz_by_toc_digest() -> None:
    verdict = classify_layer(GZ, {ESTARGZ_TOC_DIGEST: SHA})
    assert verdict.format == "estargz" and verdict.lazy
    assert classify_layer(DOCKER_GZ, {ESTARGZ_TOC_DIGEST: SHA}).format == "estargz"


def test_plain_gzip_is_not_lazy() -> None:
    verdict = classify_layer(GZ, {})
    assert verdict.format is None and not verdict.lazy
    assert "without eStargz" in verdict.reason


def test_zstd_chunked_current_annotations() -> None:
    verdict = classify_layer(
        ZST, {ZSTD_CHUNKED_CHECKSUM: SHA, ZSTD_CHUNKED_POSITION: "100:50:200:1"}
    )
    assert verdict.format == "zstd:chunked"
    assert "legacy" not in verdict.reason


def test_zstd_chunked_legacy_annotations() -> None:
    verdict = classify_layer(
        ZST,
        {
            LEGACY_ZSTD_CHUNKED_CHECKSUM: SHA,
            LEGACY_ZSTD_CHUNKED_POSITION: "1:2:3:1",
            ESTARGZ_TOC_DIGEST: SHA,  # the stargz variant also carries the eStargz key
        },
    )
    assert verdict.format == "zstd:chunked"
    assert "legacy" in verdict.reason


def test_zstd_with_only_checksum_is_not_lazy() -> None:
    assert classify_layer(ZST, {ZSTD_CHUNKED_CHECKSUM: SHA}).format is None


@pytest.mark.parametrize(
    ("media_type", "annotations", "reason"),
    [
        (ZST, {ZSTD_CHUNKED_CHECKSUM: "sha256:xyz", ZSTD_CHUNKED_POSITION: "1:2:3:1"}, "malformed"),
        (ZST, {ZSTD_CHUNKED_CHECKSUM: SHA, ZSTD_CHUNKED_POSITION: "1:2"}, "malformed"),
        (ZST, {ZSTD_CHUNKED_CHECKSUM: SHA, ZSTD_CHUNKED_POSITION: "1:0:3:1"}, "malformed"),
        (GZ, {ESTARGZ_TOC_DIGEST: "md5:abc"}, "malformed"),
        ("application/vnd.oci.image.layer.v1.tar", {ESTARGZ_TOC_DIGEST: SHA}, "uncompressed"),
        ("application/vnd.oci.image.config.v1+json", {}, "not a lazily readable"),
    ],
)
def test_not_lazy_with_reason(media_type: str, annotations: dict[str, str], reason: str) -> None:
    verdict = classify_layer(media_type, annotations)
    assert verdict.format is None
    assert reason in verdict.reason


def test_media_type_parameters_and_case() -> None:
    assert classify_layer(GZ.upper() + "; foo=bar", {ESTARGZ_TOC_DIGEST: SHA}).format == "estargz"


def test_gzip_layer_ignores_zstd_annotations() -> None:
    annotations = {ZSTD_CHUNKED_CHECKSUM: SHA, ZSTD_CHUNKED_POSITION: "1:2:3:1"}
    assert classify_layer(GZ, annotations).format is None


@given(
    st.text(max_size=60), st.dictionaries(st.text(max_size=40), st.text(max_size=80), max_size=5)
)
def test_total_and_consistent(media_type: str, annotations: dict[str, str]) -> None:
    verdict = classify_layer(media_type, annotations)
    assert verdict.format in (None, "estargz", "zstd:chunked")
    assert verdict.reason
    assert verdict == classify_layer(media_type, dict(annotations))
