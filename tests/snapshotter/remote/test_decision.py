"""Lazy-or-not is decided from the Prepare labels alone where they tell (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from snapshotter.labels import (
    ANNOTATION_LABEL_PREFIX,
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    ESTARGZ_TOC_DIGEST,
    MEDIA_TYPE_LABEL,
    SNAPSHOT_REF,
)
from snapshotter.remote.decision import decide
from tests.fuzzing import fuzz_settings

DIGEST = "sha256:" + "a" * 64
BASE = {
    SNAPSHOT_REF: "sha256:" + "c" * 64,
    CRI_IMAGE_REF: "registry.example/app:1",
    CRI_LAYER_DIGEST: DIGEST,
}


def test_no_snapshot_ref_is_not_a_layer_extraction() -> None:
    assert decide({CRI_IMAGE_REF: "x", CRI_LAYER_DIGEST: DIGEST}) is None


def test_missing_cri_labels_fall_back_without_network() -> None:
    decision = decide({SNAPSHOT_REF: "sha256:" + "c" * 64})
    assert decision is not None and decision.request is None and decision.format is None
    assert "cri.image-ref" in decision.reason and not decision.needs_manifest


def test_estargz_toc_label_decides_estargz() -> None:
    decision = decide({**BASE, ESTARGZ_TOC_DIGEST: "sha256:" + "b" * 64,
                       CRI_IMAGE_LAYERS: f"{DIGEST},sha256:{'d' * 64}"})
    assert decision is not None and decision.format == "estargz"
    assert decision.request is not None
    assert decision.request.annotations == {ESTARGZ_TOC_DIGEST: "sha256:" + "b" * 64}
    assert decision.request.image_layers == (DIGEST, "sha256:" + "d" * 64)


def test_forwarded_zstd_chunked_annotations_decide_zstd_chunked() -> None:
    labels = {
        **BASE,
        MEDIA_TYPE_LABEL: "application/vnd.oci.image.layer.v1.tar+zstd",
        ANNOTATION_LABEL_PREFIX + "io.github.containers.zstd-chunked.manifest-checksum":
            "sha256:" + "e" * 64,
        ANNOTATION_LABEL_PREFIX + "io.github.containers.zstd-chunked.manifest-position":
            "100:200:300:1",
    }
    decision = decide(labels)
    assert decision is not None and decision.format == "zstd:chunked"
    assert decision.request is not None
    assert decision.request.annotations[
        "io.github.containers.zstd-chunked.manifest-position"] == "100:200:300:1"


def test_only_a_manifest_can_tell_when_labels_carry_no_annotations() -> None:
    decision = decide({**BASE, CRI_MANIFEST_DIGEST: "sha256:" + "f" * 64})
    assert decision is not None and decision.needs_manifest and decision.format is None


def test_plain_gzip_media_type_falls_back_without_manifest_lookup() -> None:
    decision = decide({**BASE, CRI_MANIFEST_DIGEST: "sha256:" + "f" * 64,
                       MEDIA_TYPE_LABEL: "application/vnd.oci.image.layer.v1.tar+gzip"})
    assert decision is not None and decision.format is None and not decision.needs_manifest


def test_non_sha256_layer_digest_is_refused() -> None:
    decision = decide({**BASE, CRI_LAYER_DIGEST: "md5:abc"})
    assert decision is not None and decision.request is None
    assert "unsupported layer digest" in decision.reason


@fuzz_settings(300)
@given(st.dictionaries(
    st.sampled_from([SNAPSHOT_REF, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST,
                     CRI_IMAGE_LAYERS, ESTARGZ_TOC_DIGEST, MEDIA_TYPE_LABEL,
                     ANNOTATION_LABEL_PREFIX + "io.github.containers.zstd-chunked.manifest-position",
                     ANNOTATION_LABEL_PREFIX, "other"]),
    st.text(max_size=40),
))
def test_any_labels_give_a_decision_or_none_and_never_raise(labels: dict[str, str]) -> None:
    decision = decide(labels)
    if decision is not None:
        assert decision.reason
        assert not (decision.format and decision.request is None)
