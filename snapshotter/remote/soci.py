"""SOCI indexes of images: found once per image, verified, cached; a failure means "no index".

A found index is kept while the image stays in the cache. "No index" is not final: a failed
lookup is tried again after a short while, and an image with no index is asked about again
after a few minutes, because a v1 index can be published later (``lazysnap index --v1``, or
another node's ``[index] publish``) without changing the image.

Where the index is comes from the image manifest. Version 2: the manifest's
``com.amazon.soci.index-digest`` annotation names it, and the index is fetched by that digest.
``lazysnap pull`` forwards the annotation with each layer's labels, so the manifest is not
fetched again. Version 1: the index refers to the manifest as its subject, and is found
through the registry's referrers (the API, else the referrers tag); each candidate is fetched
by the digest the list gives and kept only if its subject is the manifest.

An index is trusted because its digest was vouched for by the manifest (v2) or because it
names the manifest (v1). It vouches in turn for each zTOC by digest, which ``open_layer``
checks when the zTOC is fetched. Anything that goes wrong here leaves the layer to containerd,
with one log line per image.
"""

from __future__ import annotations

import logging

import trio

from registry import Reference, RegistryClient, RegistryError
from snapshotter.remote.image_lookups import ImageLookups, LookupPolicy, image_key
from snapshotter.soci_index import (
    SOCI_INDEX_V1,
    SociIndex,
    SociIndexError,
    ZtocDescriptor,
)
from snapshotter.soci_index import (
    parse as parse_soci_index,
)

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 20.0
IMAGE_CACHE_SIZE = 64
# A referrers list is written by anyone who may push to the repository: try only a few.
MAX_V1_CANDIDATES = 4
# How long "no index" is believed: after a failure (a registry hiccup should not make an
# image unlazy for the life of the daemon), and after a clean answer that there is none.
FAILED_LOOKUP_SECONDS = 30.0
ABSENT_INDEX_SECONDS = 300.0


class SociIndexes:
    """The SOCI index of each image, looked up at most once while it stays in the cache."""

    def __init__(self, client: RegistryClient, cache_size: int = IMAGE_CACHE_SIZE) -> None:
        self._client = client
        self._lookups: ImageLookups[SociIndex] = ImageLookups(LookupPolicy(
            "soci index", (RegistryError, SociIndexError), LOOKUP_TIMEOUT_SECONDS,
            FAILED_LOOKUP_SECONDS, ABSENT_INDEX_SECONDS, cache_size,
        ))

    @property
    def requests(self) -> int:
        """Lookups that went to the registry, for tests."""
        return self._lookups.requests

    @property
    def lookup_results(self) -> dict[str, int]:
        """SOCI index lookups that went to the registry, by result (``image_lookups.RESULTS``)."""
        return dict(self._lookups.results)

    async def ztoc_for(
        self, ref: Reference, manifest_digest: str, index_digest: str | None, layer_digest: str
    ) -> ZtocDescriptor | None:
        """The zTOC the image's SOCI index lists for ``layer_digest``, or None.

        ``index_digest`` is the v2 index the manifest names, None when it names none.
        """
        index = await self.index_of(ref, manifest_digest, index_digest)
        return None if index is None else index.ztoc_for(layer_digest)

    def start(self, ref: Reference, manifest_digest: str, index_digest: str | None) -> bool:
        """Begin the image's lookup ahead of its Prepares (lazysnap pull announces its layers
        before containerd stores the image); True if it started. Prepares then join it."""
        if image_key(ref, manifest_digest) in self._lookups:
            return False
        trio.lowlevel.spawn_system_task(self._look_ahead, ref, manifest_digest, index_digest)
        return True

    async def _look_ahead(
        self, ref: Reference, manifest_digest: str, index_digest: str | None
    ) -> None:
        try:
            await self.index_of(ref, manifest_digest, index_digest)
        except Exception as exc:  # a system task must not raise; the Prepare reports failures
            log.warning("soci index lookup ahead failed error=%r", exc)

    async def index_of(
        self, ref: Reference, manifest_digest: str, index_digest: str | None
    ) -> SociIndex | None:
        return await self._lookups.get(
            ref, manifest_digest,
            lambda: self._find(ref, manifest_digest, index_digest),
            lambda index: log.info(
                "soci index found image=%s manifest=%s version=%d ztocs=%d",
                ref.path, manifest_digest, index.version, len(index.ztocs),
            ),
        )

    async def _find(
        self, ref: Reference, manifest_digest: str, index_digest: str | None
    ) -> SociIndex | None:
        if index_digest is not None:
            return await self._fetch_index(ref, index_digest, version=2)
        listed = await self._client.fetch_referrers(ref, manifest_digest, SOCI_INDEX_V1)
        for referrer in listed.of_type(SOCI_INDEX_V1)[:MAX_V1_CANDIDATES]:
            try:
                index = await self._fetch_index(ref, referrer.digest, version=1)
            except (RegistryError, SociIndexError) as exc:
                log.warning("soci index refused digest=%s error=%s", referrer.digest, exc)
                continue
            if index.subject is not None and index.subject.digest == manifest_digest:
                return index
            log.warning("soci index refused digest=%s error=subject is another manifest",
                        referrer.digest)
        return None

    async def _fetch_index(self, ref: Reference, digest: str, *, version: int) -> SociIndex:
        # fetch_manifest checks the body against the digest it asked for.
        content = await self._client.fetch_manifest(ref, digest)
        index = parse_soci_index(content.content)
        if index.version != version:
            raise SociIndexError(f"index {digest} is version {index.version}, not {version}")
        return index
