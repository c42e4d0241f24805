"""Startup profiles of images: found once per image through the registry's referrers, cached;
any failure means "no profile" and the pull goes on as it would without.

A profile is an OCI artifact whose subject is the image manifest (``snapshotter.startup_profile``).
Candidates are listed by the referrers API (else the referrers tag), the newest first by their
``created`` annotation; each manifest is fetched by the digest the list gives (the client checks
the body against it), kept only if its subject is the image manifest, and its one blob is fetched
with the size the manifest states as the cap and checked against its digest. An absent profile
is asked about again after a few minutes: another node may publish one meanwhile.
"""

from __future__ import annotations

import logging

import trio

from registry import Reference, RegistryClient, RegistryError
from snapshotter.remote.image_lookups import ImageLookups, LookupPolicy, image_key
from snapshotter.startup_profile import (
    ARTIFACT_TYPE,
    CREATED,
    ProfileError,
    StartupProfile,
    parse,
    profile_blob_of,
)

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 10.0
IMAGE_CACHE_SIZE = 64
MAX_CANDIDATES = 4  # referrers lists are written by anyone who may push: try a few
FAILED_LOOKUP_SECONDS = 30.0
ABSENT_PROFILE_SECONDS = 300.0


class StartupProfiles:
    """The startup profile of each image, looked up at most once while it stays cached."""

    def __init__(self, client: RegistryClient, cache_size: int = IMAGE_CACHE_SIZE) -> None:
        self._client = client
        self._lookups: ImageLookups[StartupProfile] = ImageLookups(LookupPolicy(
            "startup profile", (RegistryError,), LOOKUP_TIMEOUT_SECONDS,
            FAILED_LOOKUP_SECONDS, ABSENT_PROFILE_SECONDS, cache_size,
        ))

    @property
    def requests(self) -> int:
        """Lookups that went to the registry, for tests."""
        return self._lookups.requests

    @property
    def lookup_results(self) -> dict[str, int]:
        """Startup profile lookups that went to the registry, by result
        (``image_lookups.RESULTS``)."""
        return dict(self._lookups.results)

    def start(self, ref: Reference, manifest_digest: str) -> bool:
        """Begin the lookup ahead of the image's Prepares; True if it started."""
        if image_key(ref, manifest_digest) in self._lookups:
            return False
        trio.lowlevel.spawn_system_task(self._look_ahead, ref, manifest_digest)
        return True

    async def _look_ahead(self, ref: Reference, manifest_digest: str) -> None:
        try:
            await self.profile_of(ref, manifest_digest)
        except Exception as exc:  # a system task must not raise
            log.warning("startup profile lookup ahead failed error=%r", exc)

    async def profile_of(self, ref: Reference, manifest_digest: str) -> StartupProfile | None:
        return await self._lookups.get(
            ref, manifest_digest,
            lambda: self._find(ref, manifest_digest),
            lambda profile: log.info(
                "startup profile found image=%s manifest=%s layers=%d files=%d dropped=%d",
                ref.path, manifest_digest, len(profile.layers),
                sum(len(files) for files in profile.layers.values()), profile.dropped,
                extra={"event": "startup_profile_found"},
            ),
        )

    async def _find(self, ref: Reference, manifest_digest: str) -> StartupProfile | None:
        listed = await self._client.fetch_referrers(ref, manifest_digest, ARTIFACT_TYPE)
        candidates = sorted(listed.of_type(ARTIFACT_TYPE),
                            key=lambda r: r.annotations.get(CREATED, ""), reverse=True)
        for referrer in candidates[:MAX_CANDIDATES]:
            try:
                return await self._fetch(ref, manifest_digest, referrer.digest)
            except (RegistryError, ProfileError) as exc:
                log.warning("startup profile refused digest=%s error=%s: %s", referrer.digest,
                            type(exc).__name__, exc)
        return None

    async def _fetch(self, ref: Reference, manifest_digest: str, digest: str) -> StartupProfile:
        content = await self._client.fetch_manifest(ref, digest)
        blob = profile_blob_of(content.content, manifest_digest)
        # fetch_blob checks the bytes against the digest and caps them at the stated size.
        body = await self._client.fetch_blob(ref, blob.digest, size=blob.size)
        return parse(body)

