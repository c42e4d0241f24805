"""Fuzzing the descriptor rule of snapshotter.lazy_formats: it never raises, and it reads a
manifest position exactly as fusefs does (the two restate one rule)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fusefs.formats.annotations import parse_manifest_position
from snapshotter import labels
from snapshotter.lazy_formats import classify_layer, valid_manifest_position
from tests.fusefs.test_footer_fuzz import positions
from tests.fuzzing import fuzz_settings

SHA = "sha256:" + "ab" * 32
media_types = st.one_of(
    st.sampled_from([
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar+zstd; x=y",
        " APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR+ZSTD ",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar",
        "",
        ";",
    ]),
    st.text(max_size=20),
)  # fmt: skip
annotation_keys = st.sampled_from([
    labels.ZSTD_CHUNKED_CHECKSUM, labels.ZSTD_CHUNKED_POSITION,
    labels.LEGACY_ZSTD_CHUNKED_CHECKSUM, labels.LEGACY_ZSTD_CHUNKED_POSITION,
    labels.ESTARGZ_TOC_DIGEST, "other",
])  # fmt: skip
annotation_values = st.one_of(positions, st.sampled_from([SHA, SHA.upper(), SHA + "\n", ""]))


@fuzz_settings(300)
@given(media_type=media_types, annotations=st.dictionaries(annotation_keys, annotation_values))
def test_classify_layer_always_answers(media_type: str, annotations: dict[str, str]) -> None:
    found = classify_layer(media_type, annotations)
    assert found.reason
    if found.format == "zstd:chunked":
        given_positions = [
            annotations.get(labels.ZSTD_CHUNKED_POSITION, ""),
            annotations.get(labels.LEGACY_ZSTD_CHUNKED_POSITION, ""),
        ]
        assert any(parse_manifest_position(p) is not None for p in given_positions)


@fuzz_settings(1000)
@given(positions)
def test_both_sides_read_any_manifest_position_alike(value: str) -> None:
    assert valid_manifest_position(value) is (parse_manifest_position(value) is not None)
