"""``[profile] publish``: record which files an image's first container reads in its first
seconds and push them as the image's startup profile, an OCI referrer of its manifest, so that
every later pull (any node) prefetches them (``snapshotter/remote/profiles.py``, docs/profile.md).

``LazyLayers`` tells ``attached`` of each layer it attaches for an image manifest. One job per
manifest (at most once per daemon while remembered) then waits for the image's first read in
any of its layers, waits ``record_seconds`` more, takes what fusefs recorded in that window
(``LazyFilesystem.first_reads``), checks that the image still has no profile, and pushes the
profile blob and its artifact manifest with the daemon's own registry credentials. A registry
without the referrers API gets the referrers tag updated after the manifest, so a reader never
finds a profile it cannot read. Errors name a URL and a status, never credentials.

Every job ends in one log line with a stable ``event`` and one count of ``counts[result]``.
"""

from __future__ import annotations

import datetime
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from fusefs import FirstRead
from registry import (
    AuthenticationError,
    AuthorizationError,
    CredentialsError,
    NotFoundError,
    Reference,
    RegistryClient,
    RegistryError,
    parse_reference,
)
from snapshotter.daemon.config import ProfileConfig
from snapshotter.remote.layers import ProfiledLayer
from snapshotter.startup_profile import (
    ARTIFACT_TYPE,
    EMPTY_CONFIG,
    EMPTY_MEDIA_TYPE,
    OCI_INDEX,
    OCI_MANIFEST,
    PROFILE_MEDIA_TYPE,
    ProfiledFile,
    ProfileError,
    StartupProfile,
    add_to_referrers_tag,
    artifact_manifest,
    render,
)

log = logging.getLogger(__name__)

RESULTS = ("published", "skipped", "failed")
WAIT_FOR_FIRST_READ_SECONDS = 600.0  # an image pulled and not run for this long: no profile
POLL_SECONDS = 0.25
MAX_REMEMBERED = 1024  # manifests handled; a daemon restart forgets them (the check remains)
MAX_JOBS = 64

ReadsOf = Callable[[str], Sequence[FirstRead]]


@dataclass(slots=True)
class _Job:
    image_ref: str
    manifest_digest: str
    layers: dict[str, str] = field(default_factory=dict)  # layer id -> layer digest


class Skipped(Exception):
    pass


class ProfilePublisher:
    """Jobs run in the nursery ``run`` opens; ``attached`` is called on the trio thread."""

    def __init__(self, registry: RegistryClient, reads_of: ReadsOf, settings: ProfileConfig
                 ) -> None:
        self._registry = registry
        self._reads_of = reads_of
        self._window = settings.record_seconds
        self.counts = dict.fromkeys(RESULTS, 0)
        self._jobs: dict[str, _Job] = {}
        self._handled: OrderedDict[str, None] = OrderedDict()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def attached(self, layer: ProfiledLayer) -> None:
        key = layer.manifest_digest
        job = self._jobs.get(key)
        if job is None:
            if key in self._handled or self._nursery is None or len(self._jobs) >= MAX_JOBS:
                return
            job = self._jobs[key] = _Job(layer.image_ref, layer.manifest_digest)
            self._nursery.start_soon(self._run_job, job)
        job.layers.setdefault(layer.layer_id, layer.layer_digest)

    async def _run_job(self, job: _Job) -> None:
        where = {"image": job.image_ref, "manifest": job.manifest_digest}
        try:
            digest = await self.publish(job)
        except Skipped as skip:
            log.info("startup profile not published reason=%s image=%s", skip, job.image_ref,
                     extra={"event": "startup_profile_skipped", "reason": str(skip), **where})
            self.counts["skipped"] += 1
        except RegistryError as exc:
            denied = (isinstance(exc, AuthenticationError | AuthorizationError | CredentialsError)
                      or exc.status in (401, 403))
            log.warning("startup profile publish failed: %s: %s", type(exc).__name__, exc,
                        extra={"event": "startup_profile_publish_failed",
                               "reason": "denied" if denied else "registry_error", **where})
            self.counts["failed"] += 1
        except Exception as exc:
            log.exception("startup profile publish failed unexpectedly",
                          extra={"event": "startup_profile_publish_failed", "reason": "internal",
                                 "error": type(exc).__name__, **where})
            self.counts["failed"] += 1
        else:
            log.info("startup profile published image=%s manifest=%s profile=%s", job.image_ref,
                     job.manifest_digest, digest, extra={
                "event": "startup_profile_published", "profile": digest, **where})
            self.counts["published"] += 1
        finally:
            self._jobs.pop(job.manifest_digest, None)
            self._handled[job.manifest_digest] = None
            while len(self._handled) > MAX_REMEMBERED:
                self._handled.popitem(last=False)

    async def publish(self, job: _Job) -> str:
        """Record, then push; the digest of the artifact manifest pushed."""
        started = await self._first_read(job)
        await trio.sleep_until(started + self._window)
        profile = self.profile_of(job, started)
        if not any(profile.layers.values()):
            raise Skipped("nothing_read")
        ref = parse_reference(job.image_ref)
        repository = Reference(ref.domain, ref.path)
        found = await self._registry.fetch_referrers(repository, job.manifest_digest,
                                                     ARTIFACT_TYPE)
        if found.of_type(ARTIFACT_TYPE):
            raise Skipped("already_profiled")
        subject = await self._registry.fetch_manifest(repository, job.manifest_digest)
        body = render(profile)
        created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        manifest = artifact_manifest(body, subject.media_type, job.manifest_digest,
                                     len(subject.content), created)
        # Blobs first, then the manifest, then the referrers tag: a reader never finds a
        # profile whose parts are missing.
        await self._registry.push_blob(repository, EMPTY_CONFIG, media_type=EMPTY_MEDIA_TYPE)
        await self._registry.push_blob(repository, body, media_type=PROFILE_MEDIA_TYPE)
        digest = await self._registry.push_manifest(repository, manifest, OCI_MANIFEST)
        if await self._registry.list_referrers(repository, job.manifest_digest) is None:
            await self._list_in_tag(repository, job.manifest_digest, manifest, digest)
        return digest

    async def _first_read(self, job: _Job) -> float:
        deadline = trio.current_time() + WAIT_FOR_FIRST_READ_SECONDS
        while trio.current_time() < deadline:
            firsts = [reads[0].seconds for layer_id in list(job.layers)
                      if (reads := self._reads_of(layer_id))]
            if firsts:
                return min(firsts)
            await trio.sleep(POLL_SECONDS)
        raise Skipped("never_read")

    def profile_of(self, job: _Job, started: float) -> StartupProfile:
        """What the image's layers read from ``started`` for ``record_seconds``."""
        end = started + self._window
        layers: dict[str, tuple[ProfiledFile, ...]] = {}
        for layer_id, digest in job.layers.items():
            files = tuple(ProfiledFile(read.path, read.read_bytes)
                          for read in self._reads_of(layer_id) if read.seconds <= end)
            if files and digest not in layers:
                layers[digest] = files
        return StartupProfile(layers, self._window)

    async def _list_in_tag(self, repository: Reference, subject: str, manifest: bytes,
                           digest: str) -> None:
        tag = subject.replace(":", "-", 1)
        try:
            existing: bytes | None = (await self._registry.fetch_manifest(repository, tag)).content
        except NotFoundError:
            existing = None
        try:
            listing = add_to_referrers_tag(existing, manifest, digest)
        except ProfileError as exc:
            raise Skipped(f"referrers tag {tag} unusable: {exc}") from exc
        await self._registry.push_manifest(Reference(repository.domain, repository.path, tag),
                                           listing, OCI_INDEX)


