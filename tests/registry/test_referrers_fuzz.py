"""Fuzzing referrers lists: only ManifestError escapes parse_referrers, and whatever it accepts
is a list of well-formed descriptors."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from registry import ManifestError, parse_referrers
from registry.reference import validate_digest
from tests.fuzzing import fuzz_settings

SHA = "sha256:" + "0123456789abcdef" * 4
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
descriptors = st.fixed_dictionaries(
    {},
    optional={
        "mediaType": st.one_of(st.just("application/vnd.oci.image.manifest.v1+json"), scalars),
        "digest": st.one_of(st.just(SHA), st.sampled_from(["sha256:12", "md5:00", ""]), scalars),
        "size": st.one_of(st.integers(-5, 2**40), scalars),
        "artifactType": st.one_of(st.just("application/vnd.amazon.soci.index.v1+json"), scalars),
        "annotations": st.one_of(st.dictionaries(st.text(max_size=4), scalars, max_size=3),
                                 scalars),
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), scalars),
        "mediaType": st.one_of(st.just(OCI_INDEX), scalars),
        "manifests": st.one_of(st.lists(st.one_of(descriptors, scalars), max_size=4), scalars),
    },
)


def _body(draw: Any) -> bytes:
    return json.dumps(draw).encode()


@fuzz_settings()
@given(st.one_of(documents.map(_body), st.binary(max_size=64)))
def test_only_manifest_errors_escape_and_accepted_lists_are_well_formed(body: bytes) -> None:
    try:
        found = parse_referrers(body, "api")
    except ManifestError:
        return
    for referrer in found.referrers:
        validate_digest(referrer.digest)
        assert isinstance(referrer.media_type, str)
        assert isinstance(referrer.size, int) and referrer.size >= 0
        assert referrer.artifact_type is None or isinstance(referrer.artifact_type, str)
        assert all(isinstance(k, str) and isinstance(v, str)
                   for k, v in referrer.annotations.items())
