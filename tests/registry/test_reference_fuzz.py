"""Fuzzing image references: only InvalidReferenceError escapes, and a parsed reference
printed and parsed again is the same reference."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from registry.errors import InvalidReferenceError, UnsupportedDigestError
from registry.reference import parse_reference, validate_digest
from tests.fuzzing import fuzz_settings

SHA = "sha256:" + "0123456789abcdef" * 4
domains = st.sampled_from([
    "", "localhost/", "localhost:5000/", "Example.COM/", "[::1]:5000/", "[::1/", "[zz]/",
    "index.docker.io/", "docker.io/", "a-.b/", "a..b/", "host:99999/", "host:/", "h:1:2/",
    "127.0.0.1:5000/", "[fe80::1%eth0]/", "xn--bcher-kva.example/",
])  # fmt: skip
components = st.one_of(
    st.sampled_from(["busybox", "library", "a.b", "a__b", "a---b", "A", "_a", "a_", "", "ü", "..",
                     "a" * 130]),
    st.text(alphabet="abz09._-A:@/", max_size=12),
)  # fmt: skip
suffixes = st.one_of(
    st.sampled_from(["", ":latest", ":v1.2", ":-x", ":" + "t" * 129, ":é", "@" + SHA,
                     ":t@" + SHA, "@sha256:abc", "@md5:" + "0" * 32, "@" + SHA.upper(),
                     "@sha512:" + "0" * 128, "@", ":"]),
    st.text(alphabet=":@sha256abcdef0123456789", max_size=20),
)  # fmt: skip
references = st.one_of(
    st.builds(lambda d, c, s: d + "/".join(c) + s, domains, st.lists(components, max_size=4),
              suffixes),
    st.text(max_size=60),
)  # fmt: skip


@fuzz_settings(500)
@given(references)
def test_references_parse_or_raise_invalid_reference_and_round_trip(text: str) -> None:
    try:
        reference = parse_reference(text)
    except InvalidReferenceError:
        return
    assert parse_reference(str(reference)) == reference
    if reference.digest is not None:
        assert validate_digest(reference.digest) == reference.digest


@fuzz_settings(300)
@given(st.one_of(suffixes.map(lambda s: s.lstrip(":@")), st.text(max_size=80)))
def test_digests_validate_or_raise_unsupported_digest(text: str) -> None:
    try:
        assert validate_digest(text) == text
    except UnsupportedDigestError:
        return
