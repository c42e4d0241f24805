"""Registry credentials from kubelet's credential provider plugins, kept as kubelet keeps them.

For a lookup of a host and repository, each provider whose ``matchImages`` matches
``host/repository`` is asked in the order of the configuration, and the first answer with an
``auth`` key matching the image gives the credentials (the most specific key first, as kubelet
sorts them). An answer is cached under the image, its registry, or globally, as its
``cacheKeyType`` says, for its ``cacheDuration`` or else the provider's default; a duration of 0
is not cached. Before an answer expires it is asked for again in the background, so lazy reads
do not wait for the plugin. After the registry refuses the credentials, ``forget`` drops the
cached answers, so the next lookup runs the plugin again.

A plugin that is missing, fails, hangs or answers garbage is logged (never its output) and the
lookup goes on with the next provider, then with ``fallback``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio

from registry import CredentialProvider, Credentials, forget_credentials
from snapshotter.daemon.kubelet_image_match import image_matches
from snapshotter.daemon.kubelet_provider_config import ProviderConfig
from snapshotter.daemon.kubelet_provider_exec import (
    DEFAULT_TIMEOUT_SECONDS,
    ProviderFailed,
    ProviderResponse,
    run_provider,
)

log = logging.getLogger(__name__)

GLOBAL_KEY = "global"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# An answer is asked for again once this share of its lifetime is left.
REFRESH_AHEAD_FRACTION = 0.2

StartSoon = Callable[[Callable[[], Awaitable[None]]], None]
RunProvider = Callable[[ProviderConfig, Path, str, float], Awaitable[ProviderResponse]]


@dataclass(slots=True)
class _Cached:
    auth: Mapping[str, Credentials] = field(repr=False)
    stored_at: float
    expires_at: float
    refreshing: bool = False


def image_of(host: str, repository: str) -> str:
    """The image kubelet would ask about: ``host/repository`` (a lazy read knows no tag).
    Docker Hub is asked for under the name images carry, not its API host."""
    host = "docker.io" if host in _DOCKER_HUB_HOSTS else host
    return f"{host}/{repository}" if repository else host


def registry_of(image: str) -> str:
    return image.split("/", 1)[0]


def pick_auth(auth: Mapping[str, Credentials], image: str) -> Credentials | None:
    """The credentials of the most specific ``auth`` key matching ``image``."""
    for key in sorted(auth, reverse=True):
        if image_matches(key, image):
            return auth[key]
    return None


class KubeletCredentials:
    """A CredentialProvider over kubelet credential provider plugins, then ``fallback``."""

    def __init__(
        self,
        providers: tuple[ProviderConfig, ...],
        bin_dir: Path,
        fallback: CredentialProvider | None,
        *,
        start_soon: StartSoon | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        run: RunProvider = run_provider,
    ) -> None:
        self._providers = providers
        self._bin_dir = bin_dir
        self._fallback = fallback
        self._start_soon = start_soon
        self._timeout = timeout
        self._clock = clock
        self._run = run
        self._cache: dict[tuple[str, str], _Cached] = {}  # (provider, key) -> answer
        self._locks: dict[tuple[str, str], anyio.Lock] = {}  # one plugin run per image

    def __repr__(self) -> str:
        return (f"KubeletCredentials(providers={[p.name for p in self._providers]}, "
                f"cached={sorted(self._cache)})")

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        image = image_of(host, repository)
        for provider in self._providers:
            if not any(image_matches(p, image) for p in provider.match_images):
                continue
            answer = await self._answer(provider, image)
            if answer is None:
                continue
            found = pick_auth(answer.auth, image)
            if found is not None:
                return replace(found, valid_for=self._use_for(answer))
        return await self._fallback.credentials_for(host, repository) if self._fallback else None

    def forget(self, host: str, repository: str = "") -> None:
        image = image_of(host, repository)
        for provider in self._providers:
            for key in (image, registry_of(image), GLOBAL_KEY):
                self._cache.pop((provider.name, key), None)
        forget_credentials(self._fallback, host, repository)

    def _use_for(self, answer: _Cached) -> float | None:
        """How long the registry client may use an answer before it asks again: until its
        refresh is due, so that the refresh runs while the answer is still good, then until
        it expires. An answer not cached is used for the client's own default."""
        if answer.expires_at == answer.stored_at:
            return None
        now = self._clock()
        due = self._refresh_due(answer)
        return (due if now < due else answer.expires_at) - now

    @staticmethod
    def _refresh_due(entry: _Cached) -> float:
        lifetime = entry.expires_at - entry.stored_at
        return entry.expires_at - lifetime * REFRESH_AHEAD_FRACTION

    def _cached(self, provider: ProviderConfig, image: str) -> _Cached | None:
        now = self._clock()
        for key in (image, registry_of(image), GLOBAL_KEY):
            entry = self._cache.get((provider.name, key))
            if entry is None:
                continue
            if entry.expires_at <= now:
                del self._cache[(provider.name, key)]
                continue
            return entry
        return None

    async def _answer(self, provider: ProviderConfig, image: str) -> _Cached | None:
        entry = self._cached(provider, image)
        if entry is None:
            lock = self._locks.setdefault((provider.name, image), anyio.Lock())
            async with lock:  # concurrent reads of one image run the plugin once
                entry = self._cached(provider, image)
                if entry is None:
                    return await self._ask(provider, image)
        self._refresh_if_due(provider, image, entry)
        return entry

    def _refresh_if_due(self, provider: ProviderConfig, image: str, entry: _Cached) -> None:
        if (self._start_soon is None or entry.refreshing
                or self._clock() < self._refresh_due(entry)):
            return
        entry.refreshing = True

        async def refresh() -> None:
            log.info("credential provider refresh ahead of expiry",
                     extra={"provider": provider.name, "image": image})
            if await self._ask(provider, image) is None:
                entry.refreshing = False  # the old answer stays until it expires; try again

        self._start_soon(refresh)

    async def _ask(self, provider: ProviderConfig, image: str) -> _Cached | None:
        """Run the plugin and cache its answer; None when it gave none (logged)."""
        try:
            response = await self._run(provider, self._bin_dir, image, self._timeout)
        except ProviderFailed as exc:
            log.warning("credential provider gave no credentials; the lookup goes on",
                        extra={"provider": provider.name, "image": image, "reason": str(exc)})
            return None
        except Exception as exc:  # a lookup, or the daemon's nursery, must not die of a plugin
            log.error("credential provider failed unexpectedly; the lookup goes on",
                      extra={"provider": provider.name, "image": image,
                             "reason": type(exc).__name__})
            return None
        duration = (provider.default_cache_duration if response.cache_duration is None
                    else response.cache_duration)
        now = self._clock()
        entry = _Cached(response.auth, now, now + max(duration, 0.0))
        if duration > 0:
            key = {"Image": image, "Registry": registry_of(image)}.get(
                response.cache_key_type, GLOBAL_KEY)
            self._cache[(provider.name, key)] = entry
        log.info("credential provider answered",
                 extra={"provider": provider.name, "image": image,
                        "cache_key_type": response.cache_key_type, "cache_seconds": duration,
                        "keys": sorted(response.auth)[:10]})
        return entry
