"""Fuzzing a Prepare's labels with realistic values: validate_labels raises only
InvalidArgumentError, decide never raises, and a lazy decision rests on valid annotations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fusefs.formats.annotations import parse_manifest_position
from snapshotter import labels as keys
from snapshotter.errors import InvalidArgumentError
from snapshotter.labels import validate_labels
from snapshotter.remote.decision import decide
from tests.fuzzing import fuzz_settings
from tests.snapshotter.test_lazy_formats_fuzz import annotation_values, media_types

SHA = "sha256:" + "ab" * 32
digests = st.one_of(st.just(SHA), st.sampled_from(["", "sha256:", "md5:1", SHA.upper()]),
                    st.text(max_size=10))  # fmt: skip
annotation_keys = [
    keys.ZSTD_CHUNKED_CHECKSUM, keys.ZSTD_CHUNKED_POSITION, keys.LEGACY_ZSTD_CHUNKED_CHECKSUM,
    keys.LEGACY_ZSTD_CHUNKED_POSITION, keys.ESTARGZ_TOC_DIGEST, "",
]  # fmt: skip
prepare_labels = st.fixed_dictionaries(
    {},
    optional={
        keys.SNAPSHOT_REF: st.one_of(st.just("chain-1"), st.text(max_size=6)),
        keys.CRI_IMAGE_REF: st.sampled_from(["r.example/a:b", "", "not a ref"]),
        keys.CRI_LAYER_DIGEST: digests,
        keys.CRI_MANIFEST_DIGEST: digests,
        keys.CRI_IMAGE_LAYERS: st.lists(digests, max_size=3).map(",".join),
        keys.MEDIA_TYPE_LABEL: media_types,
        keys.ESTARGZ_TOC_DIGEST: annotation_values,
        **{keys.ANNOTATION_LABEL_PREFIX + key: annotation_values for key in annotation_keys},
    },
).flatmap(lambda found: st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2).map(
    lambda extra: {**extra, **found}))  # fmt: skip


@fuzz_settings(500)
@given(prepare_labels)
def test_prepare_labels_give_a_decision_and_never_raise(labels: dict[str, str]) -> None:
    try:
        assert validate_labels(labels) == labels
    except InvalidArgumentError:
        assert "" in labels
    decision = decide(labels)
    if decision is None:
        assert not labels.get(keys.SNAPSHOT_REF)
        return
    assert decision.reason
    if decision.format == "zstd:chunked":
        assert decision.request is not None
        positions = [
            decision.request.annotations.get(key, "")
            for key in (keys.ZSTD_CHUNKED_POSITION, keys.LEGACY_ZSTD_CHUNKED_POSITION)
        ]
        assert any(parse_manifest_position(p) is not None for p in positions)
    if decision.request is not None:
        assert decision.request.layer_digest.startswith("sha256:")
