from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry import InvalidReferenceError, parse_reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
        ("127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
        ("ghcr.io/org/app@" + D, "ghcr.io", "org/app", None, D),
        ("ghcr.io/org/app:v2@" + D, "ghcr.io", "org/app", "v2", D),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        ("[fe80::1]/x:t", "[fe80::1]", "x", "t", None),
        ("Example.COM/app", "example.com", "app", "latest", None),
        ("a.b/c__d-e.f", "a.b", "c__d-e.f", "latest", None),
        # Found by fuzzing: a host that is one only by its capitals was lowercased into a Docker
        # Hub namespace, so the printed reference named another image ("a/busybox").
        ("A/busybox", "A", "busybox", "latest", None),
    ],
)
def test_parse_and_normalise(
    text: str, domain: str, path: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)


def test_printed_references_parse_back_to_themselves() -> None:
    for text in ("A/busybox", "Example.COM/app", "LOCALHOST/x", "busybox"):
        ref = parse_reference(text)
        assert parse_reference(str(ref)) == ref


def test_str_and_object() -> None:
    ref = parse_reference("busybox")
    assert str(ref) == "docker.io/library/busybox:latest"
    assert ref.object == "latest"
    pinned = parse_reference("r.io/a:t@" + D)
    assert pinned.object == D
    assert str(pinned) == f"r.io/a:t@{D}"
    assert parse_reference(str(pinned)) == pinned


def test_no_default_tag() -> None:
    assert parse_reference("r.io/a", default_tag=False).tag is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        (" busybox", "spaces"),
        ("Busybox", "lowercase"),
        ("r.io/app:", "bad tag"),
        ("r.io/app:-x", "bad tag"),
        ("r.io/app@sha256:abc", "needs 64"),
        ("r.io/app@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("r.io//app", "bad path component"),
        ("r.io/app_", "bad path component"),
        ("::1:5000/x", "in brackets"),
        ("[::1/x", "unclosed"),
        ("r.io:99999/x", "bad port"),
        ("r.io/" + "a" * 300, "longer than 255"),
    ],
)
def test_invalid_references_say_why(text: str, why: str) -> None:
    with pytest.raises(InvalidReferenceError, match=why):
        parse_reference(text)


component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,5}){0,2}", fullmatch=True)
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(
    host=st.sampled_from(["r.io", "localhost:5000", "[::1]:5000", "10.0.0.1", "docker.io"]),
    parts=st.lists(component, min_size=1, max_size=3),
    tag=tag,
    digest=st.one_of(st.none(), st.from_regex(r"[0-9a-f]{64}", fullmatch=True)),
)
def test_round_trip(host: str, parts: list[str], tag: str, digest: str | None) -> None:
    text = f"{host}/{'/'.join(parts)}:{tag}" + (f"@sha256:{digest}" if digest else "")
    ref = parse_reference(text)
    assert ref.tag == tag
    assert parse_reference(str(ref)) == ref
