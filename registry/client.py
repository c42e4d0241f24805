"""The registry client: resolve, manifests, ranged and whole blobs, push.

Each operation tries the registry's hosts in order, mirrors first as hosts.toml lists them. It
skips hosts without the needed capability and moves to the next host when one fails.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import httpx

from registry._body import MAX_MANIFEST_SIZE, MAX_SMALL_BODY, OversizedBodyError, read_capped
from registry._http import Engine, RetryableError, TransportFactory, error_from_response
from registry.auth import repository_scope
from registry.blob import RemoteBlob
from registry.credentials import CredentialProvider, DockerConfigCredentials
from registry.errors import (
    DigestMismatchError,
    HostsConfigError,
    ManifestError,
    NotFoundError,
    ProtocolError,
    RegistryError,
    ServerError,
    TransportError,
)
from registry.hosts import HostsConfig, RegistryHost, with_namespace
from registry.manifest import (
    ACCEPT_MANIFESTS,
    OCI_INDEX,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_manifest,
    select_manifest,
    sha256_digest,
    verify_digest,
)
from registry.options import ClientOptions
from registry.redact import safe_url
from registry.reference import Reference, validate_digest
from registry.referrers import ReferrerList, fallback_tag, parse_referrers
from registry.stats import RegistryStats

log = logging.getLogger(__name__)

T = TypeVar("T")
OCTET_STREAM = "application/octet-stream"
DEFAULT_MAX_FETCH = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: httpx.Headers
    content: bytes
    url: str


def _expect(
    ok: Collection[int], what: str, *, body: bool = True, limit: int = MAX_SMALL_BODY
) -> Callable[[httpx.Response], Awaitable[_Answer]]:
    """A handler for answers with a status in ``ok`` and a body of at most ``limit`` bytes."""

    async def handle(response: httpx.Response) -> _Answer:
        if response.status_code not in ok:
            raise await error_from_response(response, what)
        content = await read_capped(response, limit, what) if body else b""
        expected = response.headers.get("content-length")
        if body and expected is not None and expected.isdigit() and len(content) != int(expected):
            raise RetryableError(
                TransportError(f"{what}: truncated body", url=safe_url(response.url))
            )
        return _Answer(response.status_code, response.headers, content, str(response.url))

    return handle


@dataclass(frozen=True, slots=True)
class ManifestContent:
    """A manifest or index exactly as the registry sent it, verified against its digest."""

    content: bytes
    media_type: str
    digest: str


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """What a reference names, byte for byte as the registry sent it: the target, an index or a
    manifest, and the platform's manifest. Without an index the two are the same."""

    reference: Reference
    target: Descriptor
    target_content: bytes
    index: Index | None
    manifest_digest: str
    manifest_content: bytes
    manifest: Manifest
    platform: Platform | None  # the index entry's platform, when there was an index

    @property
    def digest(self) -> str:
        return self.target.digest

    @property
    def media_type(self) -> str:
        return self.target.media_type


class RegistryClient:
    """An async OCI distribution client. Use as ``async with RegistryClient(...) as client``."""

    def __init__(
        self,
        hosts: HostsConfig | None = None,
        credentials: CredentialProvider | None = None,
        options: ClientOptions | None = None,
        *,
        _transport_factory: TransportFactory | None = None,
    ) -> None:
        self._hosts_config = hosts or HostsConfig()
        self._engine = Engine(options or ClientOptions(), credentials, _transport_factory)
        self._hosts_cache: dict[str, list[RegistryHost]] = {}

    def __repr__(self) -> str:
        return f"RegistryClient({self._hosts_config!r})"

    @property
    def options(self) -> ClientOptions:
        return self._engine.options

    @property
    def stats(self) -> RegistryStats:
        """Live counters of this client (not of clients made by ``with_credentials``)."""
        return self._engine.stats

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._engine.aclose()

    async def warm_up(self) -> None:
        """Load the CA bundle now, so that the first request does not wait for it."""
        await self._engine.warm_up()

    def with_credentials(self, credentials: CredentialProvider) -> RegistryClient:
        """A client of the same hosts and options with other credentials and nothing learnt
        yet: no challenge, token or credentials of this one can make its requests succeed."""
        return RegistryClient(
            self._hosts_config,
            credentials,
            self.options,
            _transport_factory=self._engine.transport_factory,
        )

    async def check_access(self, registry: str, ref: Reference | None = None) -> None:
        """Raise the registry's error unless it lets this client's credentials read ``ref``'s
        manifest (the request a pull starts with, so its errors read the same), or without
        ``ref`` log in to ``registry`` (``GET /v2/``)."""
        if ref is not None:
            await self.fetch_manifest(ref)
            return

        async def on_host(host: RegistryHost) -> None:
            what = f"log in to {host.netloc}"
            await self._engine.call(
                host, "GET", host.url(""), _expect({200}, what, body=False),
                scopes=(), what=what,
            )

        await self._failover(registry, "pull", on_host)

    # -- hosts ----------------------------------------------------------------------------

    async def hosts_for(self, registry: str, capability: str) -> list[RegistryHost]:
        hosts = self._hosts_cache.get(registry)
        if hosts is None:
            configured = await anyio.to_thread.run_sync(self._hosts_config.hosts_for, registry)
            hosts = with_namespace(configured, registry)
            self._hosts_cache[registry] = hosts
        usable = [h for h in hosts if h.can(capability)]
        if not usable:
            raise HostsConfigError(f"no host of {registry} has the {capability!r} capability")
        return usable

    async def _failover(
        self, ref: Reference | str, capability: str, op: Callable[[RegistryHost], Awaitable[T]]
    ) -> T:
        domain = ref if isinstance(ref, str) else ref.domain
        hosts = await self.hosts_for(domain, capability)
        # With one host there is nothing to choose, so nothing to learn about its health.
        health = self._engine.health if len(hosts) > 1 else None
        if health is not None:
            hosts = health.order(hosts)
        for index, host in enumerate(hosts):
            try:
                result = await op(host)
            except RegistryError as exc:
                if health is not None:
                    health.failed(host, exc)
                if index + 1 == len(hosts):
                    raise
                log.warning(
                    "registry host-failover registry=%s host=%s error=%s message=%r",
                    domain,
                    host.netloc,
                    type(exc).__name__,
                    exc.message,
                )
                continue
            if health is not None:
                health.succeeded(host)
            return result
        raise AssertionError("unreachable: hosts_for never returns an empty list")

    @staticmethod
    def _pull_scopes(ref: Reference) -> tuple[str, ...]:
        return (repository_scope(ref.path, ["pull"]),)

    @staticmethod
    def _push_scopes(ref: Reference, mount_from: Reference | None = None) -> tuple[str, ...]:
        scopes = [repository_scope(ref.path, ["pull", "push"])]
        if mount_from is not None and mount_from.path != ref.path:
            scopes.append(repository_scope(mount_from.path, ["pull"]))
        return tuple(scopes)

    # -- manifests ------------------------------------------------------------------------

    def _manifest_url(self, host: RegistryHost, ref: Reference, obj: str) -> str:
        return host.url(f"{ref.path}/manifests/{obj}")

    async def resolve(self, ref: Reference) -> Descriptor:
        """The descriptor a tag or digest reference points at: digest, media type and size."""
        if ref.digest is not None:
            content = await self.fetch_manifest(ref, ref.digest)
            return Descriptor(content.media_type, content.digest, len(content.content))

        async def on_host(host: RegistryHost) -> Descriptor:
            url = self._manifest_url(host, ref, ref.object)
            what = f"resolve {ref}"
            headers = {"Accept": ", ".join(ACCEPT_MANIFESTS)}
            try:
                answer = await self._engine.call(
                    host,
                    "HEAD",
                    url,
                    _expect({200}, what, body=False),
                    scopes=self._pull_scopes(ref),
                    what=what,
                    headers=headers,
                )
                digest = answer.headers.get("docker-content-digest")
                length = answer.headers.get("content-length", "")
                media_type = answer.headers.get("content-type", "").split(";")[0].strip()
                if digest and length.isdigit() and media_type:
                    return Descriptor(media_type, validate_digest(digest), int(length))
            except (ProtocolError, NotFoundError) as exc:
                # An answer the HEAD path does not understand (405, 400...): GET may work. A 404
                # to HEAD has no body: the GET brings the registry's error message.
                log.info("resolve head-failed registry=%s status=%s", ref.domain, exc.status)
            # HEAD told us too little or is unsupported: GET the manifest and hash it.
            content = await self._get_manifest(host, ref, ref.object)
            return Descriptor(content.media_type, content.digest, len(content.content))

        return await self._failover(ref, "resolve", on_host)

    async def _get_manifest(self, host: RegistryHost, ref: Reference, obj: str) -> ManifestContent:
        what = f"manifest {ref.path}:{obj}" if not obj.startswith("sha") else f"manifest {obj}"
        answer = await self._engine.call(
            host,
            "GET",
            self._manifest_url(host, ref, obj),
            _expect({200}, what, limit=MAX_MANIFEST_SIZE),
            scopes=self._pull_scopes(ref),
            what=what,
            headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
        )
        media_type = answer.headers.get("content-type", "").split(";")[0].strip()
        computed = sha256_digest(answer.content)
        claimed = answer.headers.get("docker-content-digest")
        expected = obj if ":" in obj else claimed
        if expected is not None and expected.startswith("sha256:") and expected != computed:
            raise DigestMismatchError(
                f"{what} from {host.netloc} hashes to {computed}, expected {expected}"
            )
        if expected is not None and not expected.startswith("sha256:"):
            verify_digest(answer.content, expected)
        return ManifestContent(answer.content, media_type, expected or computed)

    async def fetch_manifest(
        self, ref: Reference, digest_or_tag: str | None = None
    ) -> ManifestContent:
        """A manifest or index body, verified against the digest it was asked by."""
        obj = digest_or_tag or ref.object
        capability = "pull" if ":" in obj else "resolve"
        return await self._failover(ref, capability, lambda h: self._get_manifest(h, ref, obj))

    async def list_referrers(self, ref: Reference, digest: str) -> bytes | None:
        """The referrers API's image index of the manifests whose subject is ``digest``, or
        None when the registry has no referrers API: it answers 404 to the route (the OCI
        distribution spec says an API that exists answers 200, even with no referrers)."""
        validate_digest(digest)

        async def on_host(host: RegistryHost) -> bytes | None:
            return await self._referrers_api(host, ref, digest, None)

        return await self._failover(ref, "pull", on_host)

    async def _referrers_api(
        self, host: RegistryHost, ref: Reference, digest: str, artifact_type: str | None
    ) -> bytes | None:
        """One host's referrers API answer, or None where it has no such API (a 404)."""
        what = f"referrers of {digest}"
        # host.url adds ``ns=`` for a mirror, as on every other request to it.
        url = host.url(f"{ref.path}/referrers/{digest}",
                       None if artifact_type is None else {"artifactType": artifact_type})
        try:
            answer = await self._engine.call(
                host,
                "GET",
                url,
                _expect({200}, what, limit=MAX_MANIFEST_SIZE),
                scopes=self._pull_scopes(ref),
                what=what,
                headers={"Accept": OCI_INDEX},
            )
        except NotFoundError:
            return None
        return answer.content

    async def resolve_image(
        self, ref: Reference, platform: Platform | None = None
    ) -> ResolvedImage:
        """Resolve a reference to the image manifest for ``platform``, by default this machine's.

        One GET by tag or digest, not HEAD then GET by digest: the body is needed anyway, so a
        HEAD only costs a round trip. The body is checked against the registry's
        Docker-Content-Digest, and a 404 reads the same either way.
        """
        top = await self.fetch_manifest(ref)
        parsed = parse_manifest(top.content, top.media_type)
        target = Descriptor(top.media_type or parsed.media_type, top.digest, len(top.content))
        if isinstance(parsed, Manifest):
            return ResolvedImage(
                ref, target, top.content, None, top.digest, top.content, parsed, None
            )
        chosen = select_manifest(parsed, platform)
        content = await self.fetch_manifest(ref, chosen.digest)
        manifest = parse_manifest(content.content, chosen.media_type)
        if not isinstance(manifest, Manifest):
            raise ManifestError(f"index entry {chosen.digest} is not an image manifest")
        return ResolvedImage(
            ref, target, top.content, parsed, chosen.digest, content.content, manifest,
            chosen.platform,
        )

    # -- blobs ----------------------------------------------------------------------------

    async def fetch_referrers(
        self, ref: Reference, digest: str, artifact_type: str | None = None
    ) -> ReferrerList:
        """The manifests whose subject is ``digest``: from the referrers API, or, where the
        registry has none (a 404), from the referrers tag; no tag either means none.
        ``artifact_type`` is passed as the API's filter, which registries may ignore: callers
        filter with ``ReferrerList.of_type`` themselves."""
        validate_digest(digest)

        async def on_host(host: RegistryHost) -> ReferrerList:
            listed = await self._referrers_api(host, ref, digest, artifact_type)
            if listed is not None:
                return parse_referrers(listed, "api")
            log.info("referrers api-missing registry=%s using=tag", ref.domain)
            try:
                content = await self._get_manifest(host, ref, fallback_tag(digest))
            except NotFoundError:
                return ReferrerList((), "tag")
            return parse_referrers(content.content, "tag")

        return await self._failover(ref, "pull", on_host)

    def _blob_url(self, host: RegistryHost, ref: Reference, digest: str) -> str:
        return host.url(f"{ref.path}/blobs/{digest}")

    async def _stat_on(self, host: RegistryHost, ref: Reference, digest: str) -> int:
        what = f"blob {digest}"
        answer = await self._engine.call(
            host,
            "HEAD",
            self._blob_url(host, ref, digest),
            _expect({200}, what, body=False),
            scopes=self._pull_scopes(ref),
            what=what,
        )
        length = answer.headers.get("content-length", "")
        if not length.isdigit():
            raise ProtocolError(f"{what}: HEAD answer has no Content-Length", url=answer.url)
        return int(length)

    async def stat_blob(self, ref: Reference, digest: str) -> int:
        """The blob's size in bytes (HEAD)."""
        validate_digest(digest)
        return await self._failover(ref, "pull", lambda h: self._stat_on(h, ref, digest))

    async def open_blob(self, ref: Reference, digest: str, size: int | None = None) -> RemoteBlob:
        """A ranged reader for one blob. A ``size`` known from a descriptor saves a HEAD."""
        validate_digest(digest)
        hosts = await self.hosts_for(ref.domain, "pull")
        if size is None:
            # The blob's reads keep the configured order, so they return to a mirror once it
            # is well: one that failed this HEAD is in back-off meanwhile.
            size = await self.stat_blob(ref, digest)
        return RemoteBlob(self._engine, hosts, ref.path, digest, size, self._pull_scopes(ref))

    async def fetch_blob(
        self,
        ref: Reference,
        digest: str,
        *,
        max_size: int = DEFAULT_MAX_FETCH,
        size: int | None = None,
    ) -> bytes:
        """A small blob, such as a config or a TOC, in memory, verified against its digest.

        A ``size`` known from a descriptor tightens the cap to exactly that many bytes.
        """
        validate_digest(digest)
        limit = max_size if size is None else min(size, max_size)

        async def on_host(host: RegistryHost) -> bytes:
            what = f"blob {digest}"

            async def handle(response: httpx.Response) -> bytes:
                if response.status_code != 200:
                    raise await error_from_response(response, what)
                try:
                    return await read_capped(response, limit, what)
                except OversizedBodyError as exc:
                    raise ProtocolError(
                        f"{what}: larger than {limit} bytes", url=safe_url(response.url)
                    ) from exc

            data = await self._engine.call(
                host,
                "GET",
                self._blob_url(host, ref, digest),
                handle,
                scopes=self._pull_scopes(ref),
                what=what,
            )
            verify_digest(data, digest)
            return data

        return await self._failover(ref, "pull", on_host)

    async def download_blob(self, ref: Reference, digest: str, dest: Path) -> int:
        """Stream a whole blob to ``dest`` (via ``dest.partial``), verified; returns its size."""
        algorithm, _, expected = validate_digest(digest).partition(":")
        partial = dest.with_name(dest.name + ".partial")

        async def on_host(host: RegistryHost) -> int:
            what = f"download {digest}"

            async def handle(response: httpx.Response) -> int:
                if response.status_code != 200:
                    raise await error_from_response(response, what)
                hasher = hashlib.new(algorithm)
                size = 0
                # No fixed total deadline fits every blob size: allow the announced length at
                # the minimum rate, so a server dripping bytes cannot hold us forever.
                length = response.headers.get("content-length", "")
                budget = (
                    self.options.request_timeout + int(length) / self.options.min_download_rate
                    if length.isdigit()
                    else None  # chunked: only the read timeout bounds it
                )
                async with await anyio.open_file(partial, "wb") as out:
                    with anyio.fail_after(budget):
                        async for chunk in response.aiter_bytes(1024 * 1024):
                            hasher.update(chunk)
                            size += len(chunk)
                            await out.write(chunk)
                if hasher.hexdigest() != expected:
                    raise DigestMismatchError(
                        f"{what}: content hashes to {algorithm}:{hasher.hexdigest()}",
                        url=safe_url(response.url),
                    )
                return size

            # Long blobs are bounded by the read timeout between chunks, not a total deadline.
            return await self._engine.call(
                host,
                "GET",
                self._blob_url(host, ref, digest),
                handle,
                scopes=self._pull_scopes(ref),
                what=what,
                total_timeout=math.inf,
            )

        try:
            size = await self._failover(ref, "pull", on_host)
        except BaseException:
            await anyio.Path(partial).unlink(missing_ok=True)
            raise
        await anyio.Path(partial).rename(dest)
        return size

    # -- push -----------------------------------------------------------------------------

    async def push_blob(
        self,
        ref: Reference,
        data: bytes,
        *,
        media_type: str = OCTET_STREAM,
        mount_from: Reference | None = None,
        chunk_size: int | None = None,
    ) -> Descriptor:
        """Upload a blob unless the repository has it; mount it from ``mount_from`` if possible.

        ``chunk_size`` uploads in PATCH chunks of that size instead of one PUT.
        """

        async def read(offset: int, length: int) -> bytes:
            return data[offset : offset + length]

        return await self._push(
            ref, sha256_digest(data), len(data), read, media_type, mount_from, chunk_size
        )

    async def push_blob_file(
        self,
        ref: Reference,
        path: Path,
        *,
        media_type: str = OCTET_STREAM,
        mount_from: Reference | None = None,
        chunk_size: int | None = None,
    ) -> Descriptor:
        """Upload a blob from a file in chunks of ``options.upload_chunk_size`` by default."""
        digest, size = await anyio.to_thread.run_sync(_hash_file, path)
        async with await anyio.open_file(path, "rb") as source:

            async def read(offset: int, length: int) -> bytes:
                await source.seek(offset)
                data: bytes = await source.read(length)
                if len(data) != length:
                    raise RegistryError(f"{path} changed while it was uploaded")
                return data

            return await self._push(
                ref,
                digest,
                size,
                read,
                media_type,
                mount_from,
                chunk_size or self.options.upload_chunk_size,
            )

    async def _push(
        self,
        ref: Reference,
        digest: str,
        size: int,
        read: Callable[[int, int], Awaitable[bytes]],
        media_type: str,
        mount_from: Reference | None,
        chunk_size: int | None,
    ) -> Descriptor:
        descriptor = Descriptor(media_type, digest, size)
        scopes = self._push_scopes(ref, mount_from)

        async def on_host(host: RegistryHost) -> Descriptor:
            try:
                await self._stat_on_scoped(host, ref, digest, scopes)
                log.debug("push blob-exists digest=%s", digest)
                return descriptor
            except NotFoundError:
                pass
            # An upload session cannot resume a half-sent request, so a failed session is
            # abandoned and a new one started, with the usual backoff.
            attempts = self.options.max_attempts
            for attempt in range(attempts):
                try:
                    await self._upload(
                        host, ref, digest, size, read, scopes, mount_from, chunk_size
                    )
                    return descriptor
                except (TransportError, ServerError) as exc:
                    if attempt + 1 == attempts:
                        raise
                    log.info(
                        "push upload-retry digest=%s attempt=%d error=%s",
                        digest,
                        attempt + 1,
                        type(exc).__name__,
                    )
                    await anyio.sleep(self._engine.backoff(attempt))
            raise AssertionError("unreachable")

        return await self._failover(ref, "push", on_host)

    async def _upload(
        self,
        host: RegistryHost,
        ref: Reference,
        digest: str,
        size: int,
        read: Callable[[int, int], Awaitable[bytes]],
        scopes: Sequence[str],
        mount_from: Reference | None,
        chunk_size: int | None,
    ) -> None:
        query = {}
        if mount_from is not None and mount_from.domain == ref.domain:
            query = {"mount": digest, "from": mount_from.path}
        what = f"start upload of {digest}"
        started = await self._engine.call(
            host,
            "POST",
            host.url(f"{ref.path}/blobs/uploads/", query),
            _expect({201, 202}, what),
            scopes=scopes,
            what=what,
        )
        if started.status == 201:
            log.info("push blob-mounted digest=%s from=%s", digest, mount_from)
            return
        location = self._location(host, started)
        body = b""
        if chunk_size is not None and 0 < chunk_size < size:
            for start in range(0, size, chunk_size):
                chunk = await read(start, min(chunk_size, size - start))
                what = f"upload chunk {start} of {digest}"
                answer = await self._engine.call(
                    host,
                    "PATCH",
                    location,
                    _expect({202}, what),
                    scopes=scopes,
                    what=what,
                    content=chunk,
                    retry=False,
                    total_timeout=math.inf,
                    headers={
                        "Content-Type": OCTET_STREAM,
                        "Content-Range": f"{start}-{start + len(chunk) - 1}",
                    },
                )
                location = self._location(host, answer)
        else:
            body = await read(0, size)
        what = f"finish upload of {digest}"
        await self._engine.call(
            host,
            "PUT",
            _with_query(location, **_finish_params(host, location, digest)),
            _expect({201}, what),
            scopes=scopes,
            what=what,
            content=body,
            retry=False,
            headers={"Content-Type": OCTET_STREAM},
            total_timeout=math.inf,
        )

    async def _stat_on_scoped(
        self, host: RegistryHost, ref: Reference, digest: str, scopes: Sequence[str]
    ) -> None:
        what = f"blob {digest}"
        await self._engine.call(
            host,
            "HEAD",
            self._blob_url(host, ref, digest),
            _expect({200}, what, body=False),
            scopes=scopes,
            what=what,
        )

    @staticmethod
    def _location(host: RegistryHost, answer: _Answer) -> str:
        location: str | None = answer.headers.get("location")
        if not location:
            raise ProtocolError("upload answer without a Location header", url=answer.url)
        joined: str = urllib.parse.urljoin(answer.url, location)
        return joined

    async def push_manifest(self, ref: Reference, content: bytes, media_type: str) -> str:
        """PUT a manifest under the reference's tag, else its digest; returns the digest."""
        digest = sha256_digest(content)
        if ref.digest is not None and ref.digest != digest:
            raise DigestMismatchError(f"manifest hashes to {digest}, reference says {ref.digest}")
        obj = ref.tag or digest
        scopes = self._push_scopes(ref)

        async def on_host(host: RegistryHost) -> str:
            what = f"push manifest {ref}"
            answer = await self._engine.call(
                host,
                "PUT",
                self._manifest_url(host, ref, obj),
                _expect({201}, what),
                scopes=scopes,
                what=what,
                content=content,
                headers={"Content-Type": media_type},
            )
            claimed = answer.headers.get("docker-content-digest")
            if claimed and claimed != digest:
                raise DigestMismatchError(f"{what}: registry stored {claimed}, we sent {digest}")
            return digest

        return await self._failover(ref, "push", on_host)


def create_client(
    hosts_dir: str | os.PathLike[str] | None = None,
    *,
    docker_config: Path | None = None,
    options: ClientOptions | None = None,
) -> RegistryClient:
    """The usual client, with credentials from docker's config.json and hosts from
    ``hosts_dir``. Without it, ``$LAZYSNAP_HOSTS_DIR`` is used, else ``/etc/containerd/certs.d``.
    """
    return RegistryClient(HostsConfig(hosts_dir), DockerConfigCredentials(docker_config), options)


def _hash_file(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as source:
        while block := source.read(1024 * 1024):
            hasher.update(block)
            size += len(block)
    return "sha256:" + hasher.hexdigest(), size


def _finish_params(host: RegistryHost, location: str, digest: str) -> dict[str, str]:
    # As containerd: the upload's last PUT names the registry too when it goes to a mirror.
    params = {"digest": digest}
    parts = urllib.parse.urlsplit(location)
    named = "ns" in urllib.parse.parse_qs(parts.query)
    if host.namespace is not None and parts.netloc == host.netloc and not named:
        params["ns"] = host.namespace
    return params


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode(params)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
