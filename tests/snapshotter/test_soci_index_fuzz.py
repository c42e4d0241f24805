"""Fuzzing SOCI index manifests: only SociIndexError escapes parse, and whatever it accepts
builds back into a document that parses to the same index."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from snapshotter import soci_index as si
from tests.fuzzing import fuzz_settings

SHA = "sha256:" + "0123456789abcdef" * 4
OTHER = "sha256:" + "fedcba9876543210" * 4
scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=6)
)
digests: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([SHA, OTHER, SHA.upper(), "sha256:12", ""]), scalars
)
annotations: st.SearchStrategy[Any] = st.one_of(
    st.dictionaries(
        st.sampled_from([si.LAYER_DIGEST, si.LAYER_MEDIA_TYPE, si.SPAN_SIZE, si.DISABLE_XATTRS,
                         si.BUILD_TOOL, "x"]),
        st.one_of(digests.filter(lambda d: isinstance(d, str)),
                  st.sampled_from(["4194304", "0", "true", "-1"])),
        max_size=4,
    ),
    scalars,
)  # fmt: skip
descriptor: st.SearchStrategy[Any] = st.one_of(
    st.fixed_dictionaries(
        {"mediaType": st.one_of(st.sampled_from([si.ZTOC_MEDIA_TYPE, si.SOCI_INDEX_V1,
                                                 si.SOCI_INDEX_V2, si.OCI_MANIFEST]), scalars),
         "digest": digests,
         "size": st.one_of(st.integers(0, 2**40), scalars)},
        optional={"annotations": annotations},
    ),
    scalars,
)  # fmt: skip
documents: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), scalars),
        "mediaType": st.one_of(st.sampled_from([si.OCI_MANIFEST, si.OCI_INDEX]), scalars),
        "artifactType": st.one_of(st.sampled_from([si.SOCI_INDEX_V1, si.SOCI_INDEX_V2]), scalars),
        "config": descriptor,
        "layers": st.one_of(st.lists(descriptor, max_size=4), scalars),
        "subject": descriptor,
        "annotations": annotations,
    },
)


@fuzz_settings()
@given(documents)
def test_parse_raises_only_its_own_error_and_round_trips(doc: dict[str, object]) -> None:
    try:
        index = si.parse(json.dumps(doc).encode())
    except si.SociIndexError:
        return
    assert si.parse(si.build(index)) == index
    for layer, ztoc in index.ztocs.items():
        assert layer == ztoc.layer_digest


@fuzz_settings()
@given(st.binary(max_size=200))
def test_parse_of_arbitrary_bytes_raises_only_its_own_error(content: bytes) -> None:
    with contextlib.suppress(si.SociIndexError):
        si.parse(content)
