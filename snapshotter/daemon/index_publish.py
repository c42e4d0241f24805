"""``[index] publish``: after a node pulled an unindexed gzip image in full, build its SOCI
index from the blobs already in containerd's content store and push it as a v1 referrer, so
that the next node pulls the image lazily (docs/index.md).

``lazysnap pull`` asks through ``Daemon/ImagePulled``, and the CRI image service proxy after
each ``PullImage`` (``cri_pulled``); either only queues the job.
One job runs at a time on the trio side, one per manifest digest: it checks again that no
index exists, reads each layer blob back from containerd while hashing it, builds the zTOCs
with ``lazysnap index``'s builder and pushes with the daemon's own registry credentials. The
index manifest is pushed after every zTOC and the referrers tag after the index, so a job cut
short (a restart) leaves at most unreferenced blobs behind, never an index a reader trips on.

Every job ends in one log line with a stable ``event`` and one count of
``lazysnap_index_publish_total{result}``. A job the daemon is stopping in ends logged as
failed with reason ``stopped``; the queue is in memory only, so a restart loses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from registry import (
    AuthenticationError,
    AuthorizationError,
    CredentialsError,
    Descriptor,
    Manifest,
    Reference,
    RegistryClient,
    RegistryError,
    parse_manifest,
    parse_reference,
)
from snapshotter import errors
from snapshotter.client.containerd_api import ContentInfo
from snapshotter.convert.soci import IndexImageError, IndexOptions, index_manifest_v1
from snapshotter.convert.soci_documents import plan_layers
from snapshotter.daemon.config import IndexConfig
from snapshotter.daemon_api import MAX_MANIFEST_BYTES
from snapshotter.soci_index import IMAGE_INDEX_DIGEST, SOCI_INDEX_V1

log = logging.getLogger(__name__)

RESULTS = ("published", "skipped", "failed")
# Why a job published nothing. Fixed, so that alerts can be written against them.
FAILURE_REASONS = (
    "denied",  # the registry refused the daemon's credentials to push (401/403)
    "content_missing",  # containerd no longer has the manifest or a layer blob
    "digest_mismatch",  # bytes from the content store do not match their digest
    "not_indexable",  # a layer is not a gzip tar the zTOC builder can read
    "registry_error",  # any other registry failure
    "containerd_error",  # containerd failed otherwise
    "stopped",  # the daemon stopped during the job
    "internal",  # a bug: the traceback is logged
)
SKIP_REASONS = ("already_indexed", "nothing_to_index", "not_pulled_in_full", "denied_recently")
# A registry tells a node without push access so only at its first upload, after a zTOC was
# built: a repository that refused is not tried again for this long.
DENIED_BACKOFF_SECONDS = 3600.0
MAX_QUEUED = 64  # images waiting; more are dropped with a log line (a later pull asks again)
MAX_NAME = 4096


class PublishFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in FAILURE_REASONS
        super().__init__(message)
        self.reason = reason


class Skipped(Exception):
    def __init__(self, reason: str) -> None:
        assert reason in SKIP_REASONS
        super().__init__(reason)
        self.reason = reason


class ContentStore(Protocol):
    """containerd's content store in one namespace, as ``ContainerdClient`` serves it."""

    def content_info(self, digest: str) -> ContentInfo: ...

    def read_content(self, digest: str, *, max_size: int) -> bytes: ...

    def stream_content(self, digest: str) -> Iterator[bytes]: ...


# Opens the content store of a namespace; used from worker threads.
ContentOpener = Callable[[str], AbstractContextManager[ContentStore]]


@dataclass(frozen=True, slots=True)
class PublishJob:
    image: str  # containerd's image name
    manifest_digest: str
    namespace: str


def validate_job(job: PublishJob) -> Reference:
    """The image's repository; InvalidArgumentError for a request that cannot be a pull's."""
    if not job.namespace or len(job.namespace) > 255:
        raise errors.InvalidArgumentError("namespace must be containerd's namespace of the pull")
    if len(job.image) > MAX_NAME:
        raise errors.InvalidArgumentError("image name too long")
    try:
        ref = parse_reference(job.image)
    except ValueError as exc:
        raise errors.InvalidArgumentError(str(exc)) from exc
    algorithm, _, hex_part = job.manifest_digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64 or not _is_hex(hex_part):
        raise errors.InvalidArgumentError("manifest_digest must be a sha256 digest")
    return Reference(ref.domain, ref.path)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class IndexPublisher:
    """The queue and its one worker. ``request`` is for any thread; ``run`` runs in the
    daemon's nursery; ``counts`` is read on the trio thread."""

    def __init__(
        self,
        registry: RegistryClient,
        open_content: ContentOpener,
        settings: IndexConfig,
        work_dir: Path | None = None,
    ) -> None:
        self._registry = registry
        self._open_content = open_content
        self._options = IndexOptions(
            version=1, min_layer_size=settings.min_layer_size, span_size=settings.span_size,
            work_dir=work_dir,
        )  # fmt: skip
        self.counts = dict.fromkeys(RESULTS, 0)
        self._pending: set[str] = set()  # manifest digests queued or running
        self._lock = threading.Lock()
        self._send, self._receive = trio.open_memory_channel[PublishJob](math.inf)
        self._token: trio.lowlevel.TrioToken | None = None
        self._denied_until: dict[str, float] = {}  # repository -> trio.current_time() bound

    def request(self, job: PublishJob) -> bool:
        """Queue ``job`` unless its manifest is queued or running already; returns at once."""
        validate_job(job)
        token = self._token
        if token is None:
            return False  # not running yet, or stopped
        with self._lock:
            if job.manifest_digest in self._pending:
                return False
            if len(self._pending) >= MAX_QUEUED:
                log.warning("index publish queue full; image not queued",
                            extra={"image": job.image, "manifest": job.manifest_digest})
                return False
            self._pending.add(job.manifest_digest)
        try:
            token.run_sync_soon(self._send.send_nowait, job)
        except trio.RunFinishedError:
            with self._lock:
                self._pending.discard(job.manifest_digest)
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take jobs until cancelled; requests are taken from ``task_status.started()`` on."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        try:
            async for job in self._receive:
                try:
                    await self.publish(job)
                finally:
                    with self._lock:
                        self._pending.discard(job.manifest_digest)
        finally:
            self._token = None

    async def publish(self, job: PublishJob) -> str:
        """Run one job to its end; the result it counted."""
        where = {"image": job.image, "manifest": job.manifest_digest}
        log.info("index publish started", extra={"event": "index_publish_started", **where})
        try:
            index_digest, how = await self._publish(job)
        except Skipped as skip:
            log.info("index publish skipped: %s", skip.reason,
                     extra={"event": "index_publish_skipped", "reason": skip.reason, **where})
            return self._count("skipped")
        except PublishFailed as failure:
            if failure.reason == "denied":
                repository = str(validate_job(job))
                self._denied_until[repository] = trio.current_time() + DENIED_BACKOFF_SECONDS
            self._failed(failure.reason, str(failure), where)
            return self._count("failed")
        except trio.Cancelled:
            self._failed("stopped", "the daemon stopped", where)
            self._count("failed")
            raise
        except Exception as exc:
            log.exception("index publish failed unexpectedly")
            self._failed("internal", type(exc).__name__, where)
            return self._count("failed")
        log.info("index published", extra={"event": "index_published", "index": index_digest,
                                           "referrers": how, **where})
        return self._count("published")

    def _count(self, result: str) -> str:
        self.counts[result] += 1
        return result

    @staticmethod
    def _failed(reason: str, message: str, where: dict[str, str]) -> None:
        log.warning("index publish failed: %s", message,
                    extra={"event": "index_publish_failed", "reason": reason, **where})

    async def _publish(self, job: PublishJob) -> tuple[str, str]:
        repository = validate_job(job)
        if trio.current_time() < self._denied_until.get(str(repository), -math.inf):
            raise Skipped("denied_recently")
        body = await trio.to_thread.run_sync(self._read_manifest, job)
        manifest = _parse(body, job.manifest_digest)
        if IMAGE_INDEX_DIGEST in manifest.annotations:
            raise Skipped("already_indexed")  # a v2 index: this node pulled it in full anyway
        indexed = [plan.layer for plan in plan_layers(manifest.layers,
                                                      self._options.min_layer_size)
                   if plan.indexed]
        if not indexed:
            raise Skipped("nothing_to_index")
        if not await trio.to_thread.run_sync(self._all_stored, job.namespace, indexed):
            # Served lazily (eStargz, say) rather than pulled: nothing here to build from.
            raise Skipped("not_pulled_in_full")
        with _registry_failures():
            found = await self._registry.fetch_referrers(
                repository, job.manifest_digest, SOCI_INDEX_V1
            )
        if found.of_type(SOCI_INDEX_V1):
            raise Skipped("already_indexed")

        async def fetch(layer: Descriptor, path: Path) -> None:
            await trio.to_thread.run_sync(self._copy_blob, job.namespace, layer, path)

        with _registry_failures():
            try:
                result = await index_manifest_v1(
                    self._registry, repository, manifest, job.manifest_digest, len(body),
                    self._options, fetch,
                )  # fmt: skip
            except IndexImageError as exc:
                raise PublishFailed("not_indexable", str(exc)) from exc
        return result.index_digest, result.referrers or ""

    def _read_manifest(self, job: PublishJob) -> bytes:
        with _containerd_failures(job.manifest_digest), self._open_content(job.namespace) as store:
            body = store.read_content(job.manifest_digest, max_size=MAX_MANIFEST_BYTES)
        if _sha256(body) != job.manifest_digest:
            raise PublishFailed("digest_mismatch", f"manifest {job.manifest_digest}: the content "
                                "store's bytes do not match the digest")
        return body

    def _all_stored(self, namespace: str, layers: Sequence[Descriptor]) -> bool:
        with _containerd_failures(layers[0].digest), self._open_content(namespace) as store:
            for layer in layers:
                try:
                    store.content_info(layer.digest)
                except errors.NotFoundError:
                    return False
        return True

    def _copy_blob(self, namespace: str, layer: Descriptor, path: Path) -> None:
        """The blob into ``path``, hashed on the way: a blob whose bytes do not match its
        digest never reaches the zTOC builder."""
        with _containerd_failures(layer.digest), self._open_content(namespace) as store:
            digest, size = _write_hashed(store.stream_content(layer.digest), path)
        if size != layer.size or digest != layer.digest:
            raise PublishFailed("digest_mismatch", f"layer {layer.digest}: the content store "
                                f"holds {size} bytes of digest {digest}")


def _write_hashed(chunks: Iterable[bytes], path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("wb") as out:
        for chunk in chunks:
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _parse(body: bytes, digest: str) -> Manifest:
    try:
        manifest = parse_manifest(body)
    except RegistryError as exc:
        raise PublishFailed("not_indexable", f"{digest}: {exc}") from exc
    if not isinstance(manifest, Manifest):
        raise PublishFailed("not_indexable", f"{digest} is not an image manifest")
    return manifest


@contextlib.contextmanager
def _registry_failures() -> Iterator[None]:
    """Registry errors become PublishFailed. Their text names a URL and a status, never the
    credentials the client sent."""
    try:
        yield
    except RegistryError as exc:
        denied = isinstance(exc, AuthenticationError | AuthorizationError | CredentialsError)
        reason = "denied" if denied or exc.status in (401, 403) else "registry_error"
        raise PublishFailed(reason, f"{type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _containerd_failures(digest: str) -> Iterator[None]:
    try:
        yield
    except errors.NotFoundError as exc:
        raise PublishFailed("content_missing",
                            f"{digest} is not in containerd's content store") from exc
    except errors.SnapshotterError as exc:
        raise PublishFailed("containerd_error", f"{digest}: {exc}") from exc
