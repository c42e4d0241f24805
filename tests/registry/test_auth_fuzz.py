"""Fuzzing token answers and WWW-Authenticate challenges: only their documented errors escape
(AuthenticationError, ValueError), and a challenge written out is read back the same."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from registry.auth import Challenge, parse_token_response, parse_www_authenticate
from registry.errors import AuthenticationError
from tests.fuzzing import fuzz_settings

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**1100), 2**1100), st.floats(), st.text(max_size=8)
)
token_documents = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "token": st.one_of(st.text(max_size=12), scalars),
            "access_token": st.one_of(st.text(max_size=12), scalars),
            "expires_in": st.one_of(st.integers(-5, 10**6), st.floats(), scalars),
            "issued_at": scalars,
            "refresh_token": scalars,
        },
    ),
    scalars,
    st.lists(scalars, max_size=3),
)


def encode(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


token_bodies = st.one_of(
    token_documents.map(encode),
    st.binary(max_size=40),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(300, 2000).map(
        lambda digits: b'{"token":"t","expires_in":1' + b"0" * digits + b"}"
    ),
)


@fuzz_settings(500)
@given(body=token_bodies, now=st.floats(0, 2**40))
def test_token_answers_parse_or_raise_authentication_error(body: bytes, now: float) -> None:
    try:
        token = parse_token_response(body, now)
    except AuthenticationError:
        return
    assert token.value
    assert not math.isnan(token.expires_at) and token.expires_at >= now


tokens = st.text(alphabet="abcXYZ09-._~+/!#$%&'*^`|", min_size=1, max_size=8)
values = st.text(max_size=12)
challenges = st.lists(
    st.tuples(tokens, st.dictionaries(tokens, values, max_size=3)), min_size=1, max_size=3
)


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_challenges(items: list[tuple[str, dict[str, str]]]) -> str:
    return ", ".join(
        scheme + (" " + ", ".join(f"{k}={quote(v)}" for k, v in params.items()) if params else "")
        for scheme, params in items
    )


@fuzz_settings(500)
@given(challenges)
def test_challenges_round_trip(items: list[tuple[str, dict[str, str]]]) -> None:
    parsed = parse_www_authenticate(write_challenges(items))
    expected = []
    for scheme, params in items:
        lowered: dict[str, str] = {}
        for key, value in params.items():
            lowered[key.lower()] = value
        expected.append(Challenge(scheme.lower(), lowered))
    assert parsed == expected


@fuzz_settings(500)
@given(st.one_of(
    challenges.map(write_challenges).flatmap(
        lambda text: st.tuples(st.integers(0, len(text)), st.text(' ,="\\\t=ab', max_size=3)).map(
            lambda cut: text[: cut[0]] + cut[1] + text[cut[0] + 1 :])),
    st.text(alphabet=' \t,="\\Bearer realm=service', max_size=40),
    st.text(max_size=40),
))  # fmt: skip
def test_challenges_parse_or_raise_value_error(header: str) -> None:
    try:
        parsed = parse_www_authenticate(header)
    except ValueError:
        return
    assert all(challenge.scheme for challenge in parsed)
