"""Authentication pieces that need no network: challenges, scopes, tokens and their cache.

The token request itself is made by ``registry._http`` (it needs the HTTP client); everything
here is pure and tested synchronously.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from registry.credentials import Credentials
from registry.errors import AuthenticationError

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds; the distribution spec's default when expires_in is absent
EXPIRY_MARGIN = 10.0  # refresh a little early so a token does not expire in flight
# A longer lifetime is a server's mistake; capping it also keeps huge integers out of float().
MAX_TOKEN_LIFETIME = 365 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a scheme (lowercase) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(s for s in self.params.get("scope", "").split(" ") if s)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in ' \t,="':
        i += 1
    return text[start:i], i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    # i points just after the opening quote; backslash escapes the next character.
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise ValueError("unterminated quoted string")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into its challenges (RFC 7235 syntax, leniently)."""
    challenges: list[Challenge] = []
    i = 0
    current: Challenge | None = None
    while i < len(header):
        i = _skip_space(header, i)
        if i >= len(header):
            break
        if header[i] == ",":
            i += 1
            continue
        token, j = _read_token(header, i)
        if not token:
            raise ValueError(f"unexpected character {header[i]!r} in WWW-Authenticate")
        k = _skip_space(header, j)
        if k < len(header) and header[k] == "=" and current is not None:
            k = _skip_space(header, k + 1)
            if k < len(header) and header[k] == '"':
                value, i = _read_quoted(header, k + 1)
            else:
                value, i = _read_token(header, k)
            current.params[token.lower()] = value
        else:
            current = Challenge(token.lower())
            challenges.append(current)
            i = j
    return challenges


def pick_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """Prefer Bearer (scoped tokens) over Basic, as docker does."""
    by_scheme = {c.scheme: c for c in challenges}
    return by_scheme.get("bearer") or by_scheme.get("basic")


def repository_scope(repository: str, actions: Iterable[str]) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def scope_repository(scopes: Iterable[str]) -> str:
    """The repository of the first repository scope (the one a request is for), else ``""``."""
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        repository, sep, _actions = rest.rpartition(":")
        if kind == "repository" and sep and repository:
            return repository
    return ""


def basic_authorization(credentials: Credentials) -> str:
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # time.monotonic() based

    def __repr__(self) -> str:
        return f"Token(expires_at={self.expires_at:.0f})"


def parse_token_response(body: bytes, now: float) -> Token:
    """Read a token server's JSON answer (``token`` or ``access_token``, ``expires_in``)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # deep nesting exhausts the decoder's stack
        raise AuthenticationError("token server answered something that is not JSON") from exc
    if not isinstance(data, dict):
        raise AuthenticationError("token server answered JSON that is not an object")
    value = data.get("token") or data.get("access_token")
    if not isinstance(value, str) or not value:
        raise AuthenticationError("token server answer has no token")
    expires_in = data.get("expires_in")
    lifetime = (
        float(min(expires_in, MAX_TOKEN_LIFETIME))
        if isinstance(expires_in, int | float) and expires_in > 0
        else DEFAULT_TOKEN_LIFETIME
    )
    return Token(value, now + max(lifetime - EXPIRY_MARGIN, lifetime / 2))


TokenKey = tuple[str, str, str, frozenset[str]]  # (netloc, realm, service, scopes)


class TokenCache:
    """Bearer tokens per host, realm, service and scope set, dropped when they expire."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, Token] = {}

    def __repr__(self) -> str:
        return f"TokenCache(entries={len(self._tokens)})"

    def get(self, key: TokenKey) -> Token | None:
        token = self._tokens.get(key)
        if token is not None and token.expires_at <= self._clock():
            del self._tokens[key]
            return None
        return token

    def put(self, key: TokenKey, token: Token) -> None:
        self._tokens[key] = token

    def invalidate(self, key: TokenKey) -> None:
        self._tokens.pop(key, None)

    def now(self) -> float:
        return self._clock()
