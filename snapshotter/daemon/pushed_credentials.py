"""Registry credentials handed to the daemon over its socket, held in memory until they expire.

`lazysnap pull` may run with credentials the daemon's own docker config lacks (another user's
config, ``--user``); it passes them here so the daemon can fetch the lazy layers it serves.
They are looked up before the node's docker config, never written to disk, never logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from registry import CredentialProvider, Credentials

DEFAULT_TTL_SECONDS = 12 * 3600
MAX_TTL_SECONDS = 7 * 24 * 3600
# docker.io references are served by these hosts; credentials given for one apply to all.
_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


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
        self._by_host: dict[str, tuple[Credentials, float]] = {}

    def __repr__(self) -> str:
        with self._lock:
            return f"PushedCredentials(hosts={sorted(self._by_host)})"

    def set(self, host: str, credentials: Credentials, ttl_seconds: float) -> float:
        """Store credentials for ``host``; return the seconds until they expire."""
        ttl = min(ttl_seconds or DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS)
        with self._lock:
            self._by_host[_host_key(host)] = (credentials, self._clock() + ttl)
        return ttl

    def hosts(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return sorted(h for h, (_, expiry) in self._by_host.items() if expiry > now)

    async def credentials_for(self, host: str) -> Credentials | None:
        key = _host_key(host)
        with self._lock:
            found = self._by_host.get(key)
            if found is not None and found[1] <= self._clock():
                del self._by_host[key]
                found = None
        if found is not None:
            return found[0]
        return await self._fallback.credentials_for(host) if self._fallback else None
