from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry import AuthenticationError, Credentials
from registry.auth import (
    MAX_TOKEN_LIFETIME,
    Token,
    TokenCache,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    pick_challenge,
    repository_scope,
)


def test_parse_bearer_challenge() -> None:
    (c,) = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull repository:x:push"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scopes == ("repository:library/busybox:pull", "repository:x:push")


def test_parse_several_challenges_and_escapes() -> None:
    challenges = parse_www_authenticate(
        r'Basic realm="a \"quoted\" realm", Bearer realm=https://t.test/tok, error="invalid_token"'
    )
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].realm == 'a "quoted" realm'
    assert challenges[1].realm == "https://t.test/tok"
    assert challenges[1].params["error"] == "invalid_token"
    picked = pick_challenge(challenges)
    assert picked is not None and picked.scheme == "bearer"


def test_unterminated_quote_is_an_error() -> None:
    with pytest.raises(ValueError, match="unterminated"):
        parse_www_authenticate('Bearer realm="oops')


def test_token_response_and_cache() -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    token = parse_token_response(b'{"access_token": "abc", "expires_in": 120}', now[0])
    assert token.value == "abc" and 1000 + 60 <= token.expires_at < 1000 + 120
    key = ("r.io", "realm", "svc", frozenset({"repository:a:pull"}))
    cache.put(key, token)
    assert cache.get(key) is token
    now[0] += 200
    assert cache.get(key) is None  # expired tokens are dropped
    cache.put(key, token)
    cache.invalidate(key)
    assert cache.get(key) is None


def test_token_default_lifetime() -> None:
    token = parse_token_response(b'{"token": "t"}', 0.0)
    assert 0 < token.expires_at <= 60


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"{}", b'{"token": ""}',
     b"[" * 5000 + b"]" * 5000],  # found by fuzzing: nesting escaped as RecursionError
)  # fmt: skip
def test_bad_token_responses(body: bytes) -> None:
    with pytest.raises(AuthenticationError):
        parse_token_response(body, 0.0)


@pytest.mark.parametrize("expires_in", [b"1" + b"0" * 400, b"1e400", b"Infinity"])
def test_huge_token_lifetimes_are_capped(expires_in: bytes) -> None:
    # Found by fuzzing: an integer past float range escaped as OverflowError.
    token = parse_token_response(b'{"token": "t", "expires_in": ' + expires_in + b"}", 0.0)
    assert token.expires_at <= MAX_TOKEN_LIFETIME


def test_secrets_stay_out_of_reprs() -> None:
    creds = Credentials("alice", "hunter2", "idtok")
    token = Token("tokenvalue", 5.0)
    for text in (repr(creds), str(creds), repr(token)):
        assert "hunter2" not in text and "idtok" not in text and "tokenvalue" not in text
    assert "alice" in repr(creds)


def test_helpers() -> None:
    assert repository_scope("a/b", ["pull", "push"]) == "repository:a/b:pull,push"
    assert basic_authorization(Credentials("u", "p")) == "Basic dTpw"


@given(st.text(max_size=200))
def test_challenge_parser_is_total(text: str) -> None:
    # Any header either parses or raises ValueError: nothing else escapes to the caller.
    try:
        challenges = parse_www_authenticate(text)
    except ValueError:
        return
    for challenge in challenges:
        assert challenge.scheme == challenge.scheme.lower()


@given(
    realm=st.text(
        alphabet=st.characters(blacklist_characters='"\\', blacklist_categories=("Cs",)),
        max_size=40,
    ),
    service=st.from_regex(r"[a-z0-9.:-]{1,20}", fullmatch=True),
)
def test_challenge_round_trip(realm: str, service: str) -> None:
    (challenge,) = parse_www_authenticate(f'Bearer realm="{realm}", service={service}')
    assert challenge.realm == realm and challenge.service == service


def test_scope_repository_is_the_first_repository_scope() -> None:
    from registry.auth import scope_repository  # noqa: PLC0415

    assert scope_repository(["repository:team/app:pull"]) == "team/app"
    assert scope_repository(["registry:catalog:*", "repository:a/b:pull,push"]) == "a/b"
    assert scope_repository(["repository:reg:5000/x:pull"]) == "reg:5000/x"
    assert scope_repository([]) == ""
