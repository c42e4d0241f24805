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
    STARGZ_DIGEST,
    STARGZ_LAYERS,
    STARGZ_REFERENCE,
    STARGZ_URLS,
    STARGZ_URLS_PREFIX,
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


TOC = "sha256:" + "b" * 64
NEXT = "sha256:" + "d" * 64
LAST = "sha256:" + "e" * 64


def _rpull_labels(**overrides: str) -> dict[str, str]:
    """What ctr-remote image rpull (stargz-snapshotter 0.12, Debian's) sends on the Prepare of
    an eStargz image's first layer: containerd adds snapshot.ref and passes the descriptor's
    containerd.io/snapshot/ annotations, the TOC digest among them."""
    labels = {
        SNAPSHOT_REF: "sha256:" + "c" * 64,
        STARGZ_REFERENCE: "127.0.0.1:5000/e2e/app:estargz",
        STARGZ_DIGEST: DIGEST,
        STARGZ_LAYERS: f"{DIGEST},{NEXT},{LAST}",
        STARGZ_URLS: "",
        STARGZ_URLS_PREFIX + "0": "",
        STARGZ_URLS_PREFIX + "1": "",
        STARGZ_URLS_PREFIX + "2": "",
        "containerd.io/snapshot/remote/stargz.prefetch": "10485760",
        ESTARGZ_TOC_DIGEST: TOC,
    }
    labels.update(overrides)
    return labels


def test_stargz_snapshotter_labels_give_a_lazy_estargz_layer() -> None:
    decision = decide(_rpull_labels())
    assert decision is not None and decision.format == "estargz", decision
    request = decision.request
    assert request is not None
    assert request.image_ref == "127.0.0.1:5000/e2e/app:estargz"
    assert request.layer_digest == DIGEST
    assert request.image_layers == (DIGEST, NEXT, LAST)
    assert request.manifest_digest is None
    assert request.annotations == {ESTARGZ_TOC_DIGEST: TOC}


def test_cri_labels_win_over_stargz_labels_when_both_are_whole() -> None:
    labels = _rpull_labels(**{
        CRI_IMAGE_REF: "registry.example/app:1",
        CRI_LAYER_DIGEST: NEXT,
        CRI_IMAGE_LAYERS: f"{NEXT},{LAST}",
        CRI_MANIFEST_DIGEST: "sha256:" + "f" * 64,
    })
    decision = decide(labels)
    assert decision is not None and decision.request is not None
    request = decision.request
    assert (request.image_ref, request.layer_digest, request.image_layers,
            request.manifest_digest) == ("registry.example/app:1", NEXT, (NEXT, LAST),
                                         "sha256:" + "f" * 64)


def test_half_a_cri_set_is_not_mixed_with_the_stargz_set() -> None:
    decision = decide(_rpull_labels(**{CRI_IMAGE_REF: "registry.example/other:1"}))
    assert decision is not None and decision.request is not None
    assert decision.request.image_ref == "127.0.0.1:5000/e2e/app:estargz"
    assert decision.request.layer_digest == DIGEST


def test_stargz_labels_without_a_toc_annotation_fall_back_without_manifest_lookup() -> None:
    labels = _rpull_labels()
    del labels[ESTARGZ_TOC_DIGEST]
    decision = decide(labels)
    assert decision is not None and decision.format is None and not decision.needs_manifest
    assert decision.request is not None and decision.request.layer_digest == DIGEST


def test_stargz_labels_with_a_non_sha256_digest_are_refused() -> None:
    decision = decide(_rpull_labels(**{STARGZ_DIGEST: "sha512:" + "a" * 128}))
    assert decision is not None and decision.request is None and decision.format is None
    assert "unsupported layer digest" in decision.reason


def test_an_unparseable_reference_falls_back_and_is_not_echoed() -> None:
    decision = decide(_rpull_labels(**{STARGZ_REFERENCE: "user:s3cret@Not A Ref"}))
    assert decision is not None and decision.request is None and decision.format is None
    assert "not a valid reference" in decision.reason and "s3cret" not in decision.reason


def test_a_stargz_reference_without_its_digest_is_no_source() -> None:
    labels = _rpull_labels()
    del labels[STARGZ_DIGEST]
    decision = decide(labels)
    assert decision is not None and decision.request is None
    assert "stargz.digest" in decision.reason


def test_a_layer_with_its_own_urls_is_left_to_containerd() -> None:
    for key in (STARGZ_URLS, STARGZ_URLS_PREFIX + "0"):
        decision = decide(_rpull_labels(**{key: "https://foreign.example/blob"}))
        assert decision is not None and decision.format is None and decision.request is None
        assert "urls" in decision.reason


def test_a_layer_with_urls_is_left_to_containerd_on_the_cri_path_too() -> None:
    decision = decide({**BASE, ESTARGZ_TOC_DIGEST: TOC, STARGZ_URLS: "https://f.example/b"})
    assert decision is not None and decision.format is None and "urls" in decision.reason


def test_a_neighbour_with_urls_is_not_read_ahead() -> None:
    decision = decide(_rpull_labels(**{STARGZ_URLS_PREFIX + "1": "https://f.example/b,"}))
    assert decision is not None and decision.format == "estargz"
    assert decision.request is not None and decision.request.image_layers == (DIGEST, LAST)


@fuzz_settings(300)
@given(st.dictionaries(
    st.sampled_from([SNAPSHOT_REF, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST,
                     CRI_IMAGE_LAYERS, ESTARGZ_TOC_DIGEST, MEDIA_TYPE_LABEL,
                     ANNOTATION_LABEL_PREFIX + "io.github.containers.zstd-chunked.manifest-position",
                     ANNOTATION_LABEL_PREFIX, STARGZ_REFERENCE, STARGZ_DIGEST, STARGZ_LAYERS,
                     STARGZ_URLS, STARGZ_URLS_PREFIX + "0", STARGZ_URLS_PREFIX + "1", "other"]),
    st.text(max_size=40),
))
def test_any_labels_give_a_decision_or_none_and_never_raise(labels: dict[str, str]) -> None:
    decision = decide(labels)
    if decision is not None:
        assert decision.reason
        assert not (decision.format and decision.request is None)


GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def test_a_plain_gzip_layer_of_a_known_manifest_is_a_soci_candidate() -> None:
    index = "sha256:" + "f" * 64
    labels = {**BASE, CRI_MANIFEST_DIGEST: "sha256:" + "9" * 64, MEDIA_TYPE_LABEL: GZIP,
              ANNOTATION_LABEL_PREFIX + "com.amazon.soci.index-digest": index}
    decision = decide(labels)
    assert decision is not None and decision.soci and decision.format is None
    assert not decision.needs_manifest
    assert decision.request is not None
    assert decision.request.annotations["com.amazon.soci.index-digest"] == index


def test_soci_is_never_tried_for_estargz_nor_without_a_manifest_digest() -> None:
    manifest = {CRI_MANIFEST_DIGEST: "sha256:" + "9" * 64}
    estargz = decide({**BASE, **manifest, MEDIA_TYPE_LABEL: GZIP,
                      ESTARGZ_TOC_DIGEST: "sha256:" + "b" * 64})
    assert estargz is not None and estargz.format == "estargz" and not estargz.soci
    anonymous = decide({**BASE, MEDIA_TYPE_LABEL: GZIP})
    assert anonymous is not None and not anonymous.soci and anonymous.format is None
    zstd = decide({**BASE, **manifest, MEDIA_TYPE_LABEL: GZIP.replace("gzip", "zstd")})
    assert zstd is not None and not zstd.soci
