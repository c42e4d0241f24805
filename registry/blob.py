"""Random access to a remote blob: ``read_at`` with one single-range GET per call.

Satisfies ``fusefs.blob.BlobReader`` structurally. A registry that redirects blob GETs to object
storage is asked once; the redirect target is reused until it expires, fails in any way, or
the reader says its bytes failed verification (``forget_redirect``).

With mirrors, each read asks the hosts in their configured order, those in back-off last
(``registry.health``), so reads move to the origin when a mirror dies and back once it is well.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import httpx

from registry._body import OversizedBodyError, announced_length, read_capped
from registry._http import Engine, RetryableError, error_from_response
from registry.errors import (
    DigestMismatchError,
    RangeNotSatisfiableError,
    RangeNotSupportedError,
    RegistryError,
    TransportError,
)
from registry.health import is_host_fault
from registry.hosts import RegistryHost
from registry.redact import safe_url

log = logging.getLogger(__name__)

_STALE_REDIRECT_STATUSES = frozenset({401, 403, 404, 410})


class RemoteBlob:
    """One blob of one repository, read in ranges from the first host that has it."""

    def __init__(
        self,
        engine: Engine,
        hosts: Sequence[RegistryHost],
        repository: str,
        digest: str,
        size: int,
        scopes: Sequence[str],
    ) -> None:
        if not hosts:
            raise ValueError("a RemoteBlob needs at least one host")
        self._engine = engine
        self._hosts = list(hosts)
        self._repository = repository
        self._digest = digest
        self._size = size
        self._scopes = tuple(scopes)
        self._redirect: tuple[str, float] | None = None  # target URL, monotonic expiry
        self._last_host = self._hosts[0]  # the host that served the latest read
        self._missed_until: dict[str, float] = {}  # netloc -> monotonic time
        self.bytes_read = 0  # every byte this reader got from a registry, for status

    def __repr__(self) -> str:
        return f"RemoteBlob({self._repository}@{self._digest}, size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def digest(self) -> str:
        return self._digest

    def _blob_url(self, host: RegistryHost) -> str:
        return host.url(f"{self._repository}/blobs/{self._digest}")

    def _hosts_to_try(self) -> list[RegistryHost]:
        """Healthy hosts in their order, then hosts that lately lacked this blob, then hosts
        in back-off."""
        if len(self._hosts) == 1:
            return self._hosts
        ordered = self._engine.health.order(self._hosts)
        now = time.monotonic()
        missed = {n for n, until in self._missed_until.items() if until > now}
        return [h for h in ordered if h.netloc not in missed] + [
            h for h in ordered if h.netloc in missed
        ]

    def _cached_redirect(self) -> str | None:
        if self._redirect is None:
            return None
        url, expiry = self._redirect
        if time.monotonic() >= expiry:
            self._redirect = None
            return None
        return url

    async def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or a ``RegistryError``."""
        if offset < 0 or length < 0 or offset + length > self._size:
            raise RangeNotSatisfiableError(
                f"range {offset}+{length} outside blob {self._digest} of {self._size} bytes"
            )
        if length == 0:
            return b""
        hosts = self._hosts_to_try()
        health = self._engine.health if len(hosts) > 1 else None
        last: RegistryError | None = None
        for index, host in enumerate(hosts):
            try:
                data = await self._read_from(host, offset, length)
            except RangeNotSatisfiableError:
                raise  # the range is wrong, not the host
            except RegistryError as exc:
                # Another host may still serve this range: a mirror down, one without ranges,
                # one that lost the blob.
                last = exc
                if health is not None:
                    health.failed(host, exc)
                    if not is_host_fault(exc):
                        # It answered, without this blob's bytes: a cache may have them soon,
                        # so it is asked again after a while, not at once, not never.
                        ttl = self._engine.options.blob_miss_ttl
                        self._missed_until[host.netloc] = time.monotonic() + ttl
                if index + 1 < len(hosts):
                    log.warning(
                        "blob host-failover digest=%s host=%s error=%s",
                        self._digest,
                        host.netloc,
                        type(exc).__name__,
                    )
                    continue
                raise
            if health is not None:
                health.succeeded(host)
                self._missed_until.pop(host.netloc, None)
            self._last_host = host
            self._engine.stats.blob_read(host.is_mirror, len(data))
            self.bytes_read += len(data)
            return data
        assert last is not None
        raise last

    def forget_redirect(self) -> None:
        """Bytes of a read failed verification upstream: stop trusting where they came from.

        The redirect target is dropped, so the next read asks the registry again, which may
        send us somewhere healthy. With mirrors, the host that served the latest read also goes
        into back-off, so the next reads ask another host first.
        """
        if self._redirect is not None:
            log.info("blob redirect-forgotten digest=%s", self._digest)
        self._redirect = None
        host = self._last_host
        if len(self._hosts) > 1 and not self._engine.health.in_backoff(host.netloc):
            self._engine.health.failed(
                host, DigestMismatchError(f"bytes of blob {self._digest} failed verification")
            )

    async def _read_from(self, host: RegistryHost, offset: int, length: int) -> bytes:
        blob_url = self._blob_url(host)
        end = offset + length - 1
        what = f"range {offset}-{end} of blob {self._digest}"
        used_redirect: list[str | None] = [None]

        async def handle(response: httpx.Response) -> bytes:
            status = response.status_code
            if status == 206:
                data = await _read_range_body(response, length, what)
                _check_content_range(response, offset, end, what)
                final = str(response.url)
                if final != blob_url and used_redirect[0] is None:
                    self._redirect = (final, time.monotonic() + self._engine.options.redirect_ttl)
                return data
            if status == 200:
                # The whole blob is on its way: abort it unread. One such answer may come from
                # a proxy's bad moment, so it is retried like any other failed attempt.
                log.warning("blob no-range-answer host=%s digest=%s", host.netloc, self._digest)
                raise RetryableError(
                    RangeNotSupportedError(
                        f"{what}: the server ignored the Range header (answered 200)",
                        status=200,
                        url=safe_url(response.url),
                    )
                )
            if used_redirect[0] is not None and status in _STALE_REDIRECT_STATUSES:
                # The presigned target expired or was revoked: ask the registry again.
                raise _StaleRedirect
            raise await error_from_response(response, what)

        headers = {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}
        # A host that ignored ranges on every attempt lately gets one attempt per read, not
        # none: reads never fail without asking, and the first good answer clears the doubt.
        doubted = self._engine.ranges_doubted(host.netloc)
        cached = self._cached_redirect()
        if cached is not None:
            used_redirect[0] = cached
            try:
                # One attempt only: whatever goes wrong at the target, the registry can hand
                # out a fresh one, maybe elsewhere.
                data = await self._engine.call(
                    host,
                    "GET",
                    cached,
                    handle,
                    scopes=self._scopes,
                    what=what,
                    headers=headers,
                    retry=False,
                )
                self._engine.trust_ranges(host.netloc)
                return data
            except RangeNotSatisfiableError:
                raise
            except (_StaleRedirect, RegistryError) as exc:
                log.info(
                    "blob redirect-dropped digest=%s host=%s error=%s",
                    self._digest,
                    host.netloc,
                    type(exc).__name__,
                )
                if self._redirect is not None and self._redirect[0] == cached:
                    self._redirect = None  # a concurrent read may have cached a fresh one
                used_redirect[0] = None
        try:
            data = await self._engine.call(
                host,
                "GET",
                blob_url,
                handle,
                scopes=self._scopes,
                what=what,
                headers=headers,
                retry=not doubted,
            )
        except _StaleRedirect as exc:  # cannot happen without a cached target; be explicit
            raise TransportError(f"{what}: redirect target refused us") from exc
        except RangeNotSupportedError:
            self._engine.doubt_ranges(host.netloc)
            raise
        self._engine.trust_ranges(host.netloc)
        return data


async def _read_range_body(response: httpx.Response, length: int, what: str) -> bytes:
    """Exactly ``length`` bytes, read with a cap: a longer body is abandoned after one chunk."""
    url = safe_url(response.url)
    announced = announced_length(response)
    if announced is not None and announced != length:
        raise RetryableError(
            TransportError(f"{what}: server announced {announced} of {length} bytes", url=url)
        )
    try:
        data = await read_capped(response, length, what)
    except OversizedBodyError as exc:
        raise RetryableError(TransportError(f"{what}: body longer than asked", url=url)) from exc
    if len(data) != length:
        raise RetryableError(
            TransportError(f"{what}: got {len(data)} of {length} bytes (truncated body)", url=url)
        )
    return data


class _StaleRedirect(Exception):
    """A cached redirect target answered 401/403/404/410: drop it, go back to the registry."""


def _check_content_range(response: httpx.Response, start: int, end: int, what: str) -> None:
    value = response.headers.get("content-range")
    if value is None:
        return  # some servers omit it; the length check already passed
    unit, _, spec = value.partition(" ")
    first, _, rest = spec.partition("-")
    last = rest.partition("/")[0]
    if unit.strip() != "bytes" or first != str(start) or last != str(end):
        raise RetryableError(
            TransportError(f"{what}: server sent a different range ({value})", url=None)
        )
