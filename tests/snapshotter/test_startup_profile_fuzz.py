"""Fuzzing startup profiles, untrusted input from the registry: only ProfileError escapes
``parse``; whatever it keeps is absolute, normalised, bounded; and it renders back to itself."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from snapshotter import startup_profile as sp
from tests.fuzzing import fuzz_settings

SHA = "sha256:" + "0123456789abcdef" * 4
scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6))
paths = st.one_of(
    st.text(alphabet="/.ab\x00\u00e9", max_size=12), st.sampled_from(["/", "/..", "/a/../b"]),
    scalars)
files = st.lists(st.one_of(st.tuples(paths, st.one_of(st.integers(-5, 2**63), scalars))
                           .map(list), scalars), max_size=8)
layers = st.lists(st.one_of(
    st.fixed_dictionaries({}, optional={"digest": st.one_of(st.just(SHA), scalars),
                                        "files": st.one_of(files, scalars)}),
    scalars), max_size=4)
documents = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just(1), scalars), "layers": st.one_of(layers, scalars),
    "recordSeconds": scalars})


def _check(body: bytes) -> None:
    with contextlib.suppress(sp.ProfileError):
        profile = sp.parse(body)
        for digest, kept in profile.layers.items():
            assert digest.startswith("sha256:") and len(kept) <= sp.MAX_FILES_PER_LAYER
            for f in kept:
                assert sp.clean_path(f.path) == f.path and f.read_bytes >= 0
                assert ".." not in f.path.split("/") and "\x00" not in f.path
        assert sp.parse(sp.render(profile)).layers == profile.layers


@fuzz_settings()
@given(documents)
def test_structured_documents(doc: dict[str, Any]) -> None:
    _check(json.dumps(doc).encode())


@fuzz_settings()
@given(st.binary(max_size=300))
def test_arbitrary_bytes(body: bytes) -> None:
    _check(body)


@fuzz_settings()
@given(st.binary(max_size=400), st.sampled_from([SHA, "sha256:" + "f" * 64]))
def test_artifact_manifests(body: bytes, subject: str) -> None:
    with contextlib.suppress(sp.ProfileError):
        blob = sp.profile_blob_of(body, subject)
        assert 0 < blob.size <= sp.MAX_PROFILE_BYTES
