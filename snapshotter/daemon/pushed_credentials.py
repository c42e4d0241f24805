"""Registry credentials handed to the daemon over its socket, held in memory until they expire.

`lazysnap pull` may run with credentials the daemon's own docker config lacks (another user's
config, ``--user``); it passes them here so the daemon can fetch the lazy layers it serves.
They are kept per host and repository, so one client's credentials for its repository never
become those of another repository on the same host. A set given for a host without a
repository applies to the host's repositories that have none of their own. They are looked up
before the node's docker config, never written to disk, never logged.

The daemon stores a set only once the registry accepted it (see ``grpc_service``): a wrong
password cannot replace a working one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from registry import CredentialProvider, Credentials, forget_credentials

DEFAULT_TTL_SECONDS = 12 * 3600
MAX_TTL_SECONDS = 7 * 24 * 3600
# docker.io references are served by these hosts; credentials given for one apply to all.
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HOST_WIDE = ""  # the repository key of a set given for a whole host

Key = tuple[str, str]  # (host, repository)


def _host_key(host: str) -> str:
    lowered = host.strip().lower()
    return "docker.io" if lowered in _DOCKER_HUB else lowered


class PushedCredentials:
    """A CredentialProvider: pushed credentials first, then ``fallback`` (the docker config)."""

    def __init__(
        self, fallback: CredentialProvider | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fallback = fallback
        self._clock = clock
        self._lock = threading.Lock()  # set() runs on gRPC threads, lookups on the trio thread
        self._stored: dict[Key, tuple[Credentials, float]] = {}

    def __repr__(self) -> str:
        with self._lock:
            return f"PushedCredentials(entries={sorted(self._stored)})"

    def set(
        self, host: str, repository: str, credentials: Credentials, ttl_seconds: float
    ) -> float:
        """Store credentials for ``repository`` on ``host`` (``HOST_WIDE`` for all of the host's
        repositories without their own); return the seconds until they expire."""
        ttl = min(ttl_seconds or DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS)
        with self._lock:
            self._stored[(_host_key(host), repository)] = (credentials, self._clock() + ttl)
        return ttl

    def entries(self) -> list[Key]:
        """The (host, repository) pairs with credentials that have not expired."""
        now = self._clock()
        with self._lock:
            return sorted(k for k, (_, expiry) in self._stored.items() if expiry > now)

    def _live(self, key: Key) -> Credentials | None:
        found = self._stored.get(key)
        if found is not None and found[1] <= self._clock():
            del self._stored[key]
            return None
        return found[0] if found is not None else None

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        key = _host_key(host)
        with self._lock:
            found = self._live((key, repository)) if repository else None
            if found is None:
                found = self._live((key, HOST_WIDE))
        if found is not None:
            return found
        return await self._fallback.credentials_for(host, repository) if self._fallback else None

    def forget(self, host: str, repository: str = "") -> None:
        # What was handed to the daemon stays until replaced; the sources behind it may cache.
        forget_credentials(self._fallback, host, repository)
