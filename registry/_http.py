"""The httpx edge: pooled clients per TLS identity, auth, redirects, retries and error mapping.

Nothing httpx-typed leaves the ``registry`` package: handlers given to ``Engine.call`` receive
the response inside this package only, and every httpx exception becomes a ``RegistryError``
chained with ``from``.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import random
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar, cast

import anyio
import httpx

from registry import stats
from registry._body import MAX_SMALL_BODY, read_capped
from registry.auth import (
    Challenge,
    Token,
    TokenCache,
    TokenKey,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    pick_challenge,
    scope_repository,
)
from registry.credentials import CredentialProvider, Credentials, forget_credentials
from registry.errors import (
    AuthenticationError,
    AuthorizationError,
    HostsConfigError,
    NotFoundError,
    OCIErrorDetail,
    ProtocolError,
    RangeNotSatisfiableError,
    RegistryError,
    RegistryTimeoutError,
    ServerError,
    TransportError,
)
from registry.health import HostHealth
from registry.hosts import RegistryHost
from registry.options import ClientOptions
from registry.redact import redact_urls, safe_url

log = logging.getLogger(__name__)

T = TypeVar("T")
Response = httpx.Response
Handler = Callable[[httpx.Response], Awaitable[T]]
TransportFactory = Callable[[RegistryHost], httpx.AsyncBaseTransport]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024


class RetryableError(Exception):
    """Raised by a handler to ask for another attempt, for example after a truncated body."""

    def __init__(self, error: RegistryError, *, immediate: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.immediate = immediate


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, given as delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _oci_details(body: bytes) -> list[OCIErrorDetail]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # deep nesting exhausts the decoder's stack
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return []
    details = []
    for item in errors:
        if isinstance(item, dict):
            details.append(OCIErrorDetail(str(item.get("code", "")), str(item.get("message", ""))))
    return details


_STATUS_ERRORS: dict[int, type[RegistryError]] = {
    401: AuthenticationError,
    403: AuthorizationError,
    404: NotFoundError,
    416: RangeNotSatisfiableError,
}


async def _error_body(response: httpx.Response) -> bytes:
    """The start of an error answer's body: enough for its OCI error codes."""
    body = b""
    try:
        # httpx types the iterator loosely; it is an async generator, which aclosing needs.
        stream = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
    except httpx.HTTPError:
        pass  # the status alone is enough to classify
    return body[:MAX_ERROR_BODY]


async def error_from_response(response: httpx.Response, what: str) -> RegistryError:
    """The registry error for a non-success answer, with the OCI error body's codes."""
    body = await _error_body(response)
    status = response.status_code
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = ServerError if status in RETRY_STATUSES or status >= 500 else ProtocolError
    return cls(
        f"{what}: unexpected answer" if cls is ProtocolError else what,
        status=status,
        url=safe_url(response.request.url),
        details=_oci_details(body),
    )


def _describe(exc: BaseException) -> str:
    """``Type: message``, taking the message from the chain when httpx leaves it empty."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None or str(seen):
            break
        seen = seen.__cause__ or seen.__context__
    # httpx puts the request URL in some messages; its query may hold a signature.
    detail = redact_urls(str(seen)) if seen is not None else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _error_from_exception(exc: Exception, what: str, url: str) -> RegistryError:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return RegistryTimeoutError(f"{what}: timed out ({type(exc).__name__})", url=url)
    if isinstance(exc, httpx.TransportError):
        return TransportError(f"{what}: {_describe(exc)}", url=url)
    return ProtocolError(f"{what}: {_describe(exc)}", url=url)


class Engine:
    """Sends requests to registry hosts with auth, manual redirects and retries."""

    def __init__(
        self,
        options: ClientOptions,
        credentials: CredentialProvider | None,
        transport_factory: TransportFactory | None = None,
    ) -> None:
        self.options = options
        self._credential_provider = credentials
        self.transport_factory = transport_factory
        self._clients: dict[tuple[object, ...], httpx.AsyncClient] = {}
        self._system_tls: ssl.SSLContext | None = None  # system CAs only, built once
        self._challenges: dict[str, Challenge] = {}
        # (netloc, repository) -> credentials and when to look them up again
        self._credentials: dict[tuple[str, str], tuple[Credentials | None, float]] = {}
        self._tokens = TokenCache()
        self._token_locks: dict[TokenKey, anyio.Lock] = {}
        self._no_ranges_until: dict[str, float] = {}  # netloc -> monotonic expiry
        self._host_slots: dict[str, anyio.CapacityLimiter] = {}
        self.health = HostHealth(options.host_backoff_initial, options.host_backoff_max)
        self.stats = stats.RegistryStats()

    def __repr__(self) -> str:
        return f"Engine(clients={len(self._clients)}, tokens={self._tokens!r})"

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # -- what is learnt about hosts --------------------------------------------------------

    def ranges_doubted(self, netloc: str) -> bool:
        """Whether ``netloc`` ignored Range headers less than ``no_range_ttl`` ago."""
        until = self._no_ranges_until.get(netloc)
        if until is None:
            return False
        if time.monotonic() >= until:
            # A proxy restarted, a CDN node replaced: ask again rather than believe it forever.
            del self._no_ranges_until[netloc]
            return False
        return True

    def doubt_ranges(self, netloc: str) -> None:
        self._no_ranges_until[netloc] = time.monotonic() + self.options.no_range_ttl

    def trust_ranges(self, netloc: str) -> None:
        self._no_ranges_until.pop(netloc, None)

    # -- clients --------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Load the system CA bundle now, off the event loop: it costs tens of milliseconds that
        would otherwise fall on the first request, which is a daemon's first pull."""
        if self._system_tls is None:
            self._system_tls = await anyio.to_thread.run_sync(ssl.create_default_context)

    def _ssl_context(self, host: RegistryHost) -> ssl.SSLContext:
        # The system CAs plus what hosts.toml names; verification is only off when it says so.
        if not (host.ca_files or host.client_certs or host.skip_verify):
            if self._system_tls is None:
                self._system_tls = ssl.create_default_context()
            return self._system_tls  # read-only once built: clients may share it
        context = ssl.create_default_context()
        try:
            for ca in host.ca_files:
                context.load_verify_locations(cafile=str(ca))
            for cert in host.client_certs:
                context.load_cert_chain(str(cert.cert), str(cert.key) if cert.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise HostsConfigError(f"TLS files for {host.netloc}: {exc}") from exc
        if host.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def client_for(self, host: RegistryHost) -> httpx.AsyncClient:
        key = (host.skip_verify, host.ca_files, host.client_certs)
        client = self._clients.get(key)
        if client is None:
            opts = self.options
            client = httpx.AsyncClient(
                verify=self._ssl_context(host),
                http2=opts.http2,
                timeout=self._timeout_for(None),
                limits=httpx.Limits(
                    max_connections=opts.max_connections,
                    max_keepalive_connections=opts.max_connections,
                ),
                follow_redirects=False,
                transport=self.transport_factory(host) if self.transport_factory else None,
            )
            self._clients[key] = client
        return client

    # -- auth -----------------------------------------------------------------------------

    async def _credentials_for(
        self, host: RegistryHost, scopes: Sequence[str]
    ) -> Credentials | None:
        # Looked up again after a while, and after a refusal, so that rotated credentials reach
        # a long-lived daemon: a rewritten config.json, or a helper's fresh ECR password.
        # Per repository too: a provider may hold different credentials for two repositories
        # of one host, and one must not be used for the other.
        key = (host.netloc, scope_repository(scopes))
        cached = self._credentials.get(key)
        now = time.monotonic()
        if cached is None or cached[1] <= now:
            provider = self._credential_provider
            found = await self._look_up(provider, *key) if provider else None
            ttl = self.options.credentials_ttl
            if found is not None and found.valid_for is not None:
                ttl = min(ttl, max(found.valid_for, 0.0))
            cached = (found, now + ttl)
            self._credentials[key] = cached
        return cached[0]

    async def _look_up(
        self, provider: CredentialProvider, netloc: str, repository: str
    ) -> Credentials | None:
        """The provider's answer, counted by result; a failure is logged as an event."""
        try:
            found = await provider.credentials_for(netloc, repository)
        except Exception as exc:
            self.stats.credential_lookups[stats.ERROR] += 1
            log.warning("credential lookup failed host=%s error=%s", netloc, type(exc).__name__,
                        extra={"event": "credential_lookup_failed", "host": netloc})
            raise
        self.stats.credential_lookups[stats.FOUND if found else stats.NONE] += 1
        return found

    def _forget_credentials(self, host: RegistryHost, scopes: Sequence[str]) -> None:
        key = (host.netloc, scope_repository(scopes))
        self._credentials.pop(key, None)
        forget_credentials(self._credential_provider, *key)

    def _token_key(
        self, host: RegistryHost, challenge: Challenge, scopes: Sequence[str]
    ) -> TokenKey:
        return (host.netloc, challenge.realm or "", challenge.service or "", frozenset(scopes))

    async def _authorization(self, host: RegistryHost, scopes: Sequence[str]) -> str | None:
        challenge = self._challenges.get(host.netloc)
        if challenge is None:
            return None  # anonymous until the registry asks
        credentials = await self._credentials_for(host, scopes)
        if challenge.scheme == "basic":
            return basic_authorization(credentials) if credentials else None
        key = self._token_key(host, challenge, scopes)
        token = self._tokens.get(key)
        if token is None:
            lock = self._token_locks.setdefault(key, anyio.Lock())
            async with lock:  # one token fetch for many concurrent reads
                token = self._tokens.get(key)
                if token is None:
                    token = await self._counted_token(host, challenge, scopes, credentials)
                    self._tokens.put(key, token)
        return "Bearer " + token.value

    def _on_unauthorized(
        self,
        host: RegistryHost,
        challenge: Challenge,
        scopes: Sequence[str],
        sent: str | None,
    ) -> None:
        self._challenges[host.netloc] = challenge
        # Look the credentials up again on the next request, also after an anonymous refusal:
        # credentials may have appeared meanwhile in config.json or over the daemon's socket,
        # and a cached "none" must not hide them for minutes.
        self._credentials.pop((host.netloc, scope_repository(scopes)), None)
        if sent is not None:
            # Credentials were refused, maybe rotated: the sources are asked again, past any
            # cache of their own (a credential provider plugin's answer, for instance).
            forget_credentials(self._credential_provider, host.netloc, scope_repository(scopes))
        key = self._token_key(host, challenge, scopes)
        cached = self._tokens.get(key)
        # Drop the cached token only if it is the one refused: a late 401 to a request sent
        # anonymously or with an older token must not throw away a fresh token.
        if cached is not None and sent == "Bearer " + cached.value:
            self._tokens.invalidate(key)

    async def _counted_token(
        self,
        host: RegistryHost,
        challenge: Challenge,
        scopes: Sequence[str],
        credentials: Credentials | None,
    ) -> Token:
        """``_fetch_token``, counted by result; a refusal is logged as an event."""
        try:
            token = await self._fetch_token(host, challenge, scopes, credentials)
        except AuthenticationError as exc:
            self.stats.token_fetches[stats.REFUSED] += 1
            log.warning("registry token refused host=%s status=%s", host.netloc, exc.status,
                        extra={"event": "registry_token_refused", "host": host.netloc,
                               "with_credentials": credentials is not None})
            raise
        except Exception:
            self.stats.token_fetches[stats.ERROR] += 1
            raise
        self.stats.token_fetches[stats.OK] += 1
        return token

    async def _fetch_token(
        self,
        host: RegistryHost,
        challenge: Challenge,
        scopes: Sequence[str],
        credentials: Credentials | None,
    ) -> Token:
        realm = challenge.realm
        if not realm or urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise AuthenticationError(f"{host.netloc}: Bearer challenge without a usable realm")
        all_scopes = list(dict.fromkeys([*scopes, *challenge.scopes]))
        client = self.client_for(host)
        headers = {"User-Agent": self.options.user_agent}
        what = f"token for {host.netloc} from {safe_url(realm)}"
        if credentials and credentials.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": credentials.identity_token,
                "client_id": "lazysnap",
                "scope": " ".join(all_scopes),
            }
            if challenge.service:
                form["service"] = challenge.service
            request = client.build_request("POST", realm, data=form, headers=headers)
        else:
            params = httpx.QueryParams([("scope", s) for s in all_scopes])
            if challenge.service:
                params = params.add("service", challenge.service)
            if credentials and credentials.password:
                params = params.add("account", credentials.username)
                headers["Authorization"] = basic_authorization(credentials)
            request = client.build_request("GET", realm, params=params, headers=headers)
        try:
            with anyio.fail_after(self.options.request_timeout):
                # Streamed and capped: a token server must not make us read more than a token.
                response = await client.send(request, stream=True)
                try:
                    status = response.status_code
                    if status in (401, 403):
                        body = await _error_body(response)
                    elif status == 200:
                        body = await read_capped(response, MAX_SMALL_BODY, what)
                    else:
                        raise await error_from_response(response, what)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.HTTPError) as exc:
            raise _error_from_exception(exc, what, safe_url(realm)) from exc
        if status in (401, 403):
            raise AuthenticationError(
                f"{what}: the token server refused "
                + ("the configured credentials" if credentials else "anonymous access"),
                status=status,
                url=safe_url(realm),
                details=_oci_details(body),
            )
        token = parse_token_response(body, self._tokens.now())
        log.debug("auth token-fetched host=%s scopes=%s", host.netloc, ",".join(all_scopes))
        return token

    # -- sending --------------------------------------------------------------------------

    async def _send(
        self,
        host: RegistryHost,
        method: str,
        url: str,
        scopes: Sequence[str],
        headers: Mapping[str, str] | None,
        content: bytes | None,
    ) -> httpx.Response:
        """One attempt: the answer after auth and redirects; the caller must close it."""
        client = self.client_for(host)
        current, auth_retried = url, False
        for _hop in range(MAX_REDIRECTS + 1):
            request_headers: dict[str, str] = {"User-Agent": self.options.user_agent}
            same_host = urllib.parse.urlsplit(current).netloc == host.netloc
            if same_host:
                # hosts.toml headers and credentials go to the configured host only, never to
                # a redirect target elsewhere such as object storage or a CDN.
                for name, values in host.headers.items():
                    request_headers[name] = ", ".join(values)
            request_headers.update(headers or {})
            try:
                authorization = await self._authorization(host, scopes) if same_host else None
            except AuthenticationError:
                if auth_retried:
                    raise
                # The token server refused the credentials: they may have been rotated since
                # they were looked up. Ask their sources again, once.
                self._forget_credentials(host, scopes)
                auth_retried = True
                authorization = await self._authorization(host, scopes)
            if authorization:
                request_headers["Authorization"] = authorization
            request = client.build_request(
                method, current, headers=request_headers, content=content,
                timeout=self._timeout_for(host),
            )
            response = await client.send(request, stream=True)
            status = response.status_code
            if status == 401 and same_host and not auth_retried:
                challenge = pick_challenge(
                    c
                    for value in response.headers.get_list("www-authenticate")
                    for c in _safe_challenges(value)
                )
                if challenge is not None:
                    await response.aclose()
                    self._on_unauthorized(host, challenge, scopes, authorization)
                    auth_retried = True
                    continue
            if (
                status == 403
                and same_host
                and not auth_retried
                and authorization is not None
            ):
                # Some registries (ECR) answer 403 to an expired token, others to credentials
                # rotated away: fetch a fresh token, or look the credentials up again, once.
                challenge = self._challenges.get(host.netloc)
                if challenge is not None:
                    await response.aclose()
                    self._on_unauthorized(host, challenge, scopes, authorization)
                    auth_retried = True
                    continue
            if status in REDIRECT_STATUSES and "location" in response.headers:
                location = response.headers["location"]
                await response.aclose()
                current = urllib.parse.urljoin(current, location)
                if status == 303 and method != "HEAD":
                    method, content = "GET", None
                continue
            return response
        raise ProtocolError(f"more than {MAX_REDIRECTS} redirects", url=safe_url(url))

    def _timeout_for(self, host: RegistryHost | None) -> httpx.Timeout:
        # Clients are shared by hosts of one TLS identity; hosts.toml's dial_timeout is per host.
        opts = self.options
        dial = host.dial_timeout if host is not None else None
        return httpx.Timeout(
            connect=dial or opts.connect_timeout,
            read=opts.read_timeout,
            write=opts.read_timeout,
            pool=opts.connect_timeout,
        )

    def _host_limiter(self, netloc: str) -> anyio.CapacityLimiter:
        limiter = self._host_slots.get(netloc)
        if limiter is None:
            limiter = anyio.CapacityLimiter(self.options.max_requests_per_host)
            self._host_slots[netloc] = limiter
        return limiter

    def backoff(self, attempt: int) -> float:
        # Exponential with full jitter, so many readers retrying together spread out.
        ceiling = min(self.options.backoff_max, self.options.backoff_initial * (2**attempt))
        return random.uniform(0, ceiling)

    async def call(
        self,
        host: RegistryHost,
        method: str,
        url: str,
        handler: Handler[T],
        *,
        scopes: Sequence[str],
        what: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        retry: bool = True,
        total_timeout: float | None = None,
    ) -> T:
        """Send with retries; ``handler`` turns the (streaming) answer into a result.

        5xx/429 answers, connection errors, timeouts and ``RetryableError`` from the handler are
        retried with backoff (``Retry-After`` honoured); other answers go to the handler, which
        raises the right ``RegistryError`` for them. ``total_timeout`` bounds one attempt and
        defaults to ``request_timeout``. Long downloads pass ``math.inf``: their read timeouts
        bound them instead.

        A mirror gets one attempt, which must start answering within
        ``mirror_first_byte_timeout``: the hosts after it are the retry, and a slow mirror must
        not cost more than the origin would.
        """
        if host.is_mirror or host.namespace is not None:
            _refuse_multi_range(headers)
        attempts = self.options.max_attempts if retry and not host.is_mirror else 1
        first_byte = self.options.mirror_first_byte_timeout if host.is_mirror else None
        limit = self.options.request_timeout if total_timeout is None else total_timeout
        deadline = None if math.isinf(limit) else limit
        last: RegistryError | None = None
        delay = 0.0
        for attempt in range(attempts):
            if attempt:
                await anyio.sleep(delay)
            delay = self.backoff(attempt)
            try:
                # Waiting for a slot of the host counts against the attempt's time.
                with anyio.fail_after(deadline):
                    async with self._host_limiter(host.netloc):
                        with anyio.move_on_after(first_byte) as waiting:
                            response = await self._send(
                                host, method, url, scopes, headers, content
                            )
                        if waiting.cancelled_caught:
                            raise RegistryTimeoutError(
                                f"{what}: no answer from mirror {host.netloc} within "
                                f"{first_byte:g} s",
                                url=safe_url(url),
                            )
                        try:
                            if response.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                                last = await error_from_response(response, what)
                                retry_after = parse_retry_after(
                                    response.headers.get("retry-after")
                                )
                                if retry_after is not None:
                                    delay = min(retry_after, self.options.retry_after_max)
                                log.info(
                                    "registry retry what=%r status=%d attempt=%d delay=%.2f",
                                    what,
                                    response.status_code,
                                    attempt + 1,
                                    delay,
                                )
                                continue
                            return await handler(response)
                        finally:
                            await response.aclose()
            except RetryableError as exc:
                last = exc.error
                if exc.immediate:
                    delay = 0.0
            except (TimeoutError, httpx.TransportError) as exc:
                last = _error_from_exception(exc, what, safe_url(url))
                last.__cause__ = exc
            except httpx.HTTPError as exc:
                raise _error_from_exception(exc, what, safe_url(url)) from exc
            log.info(
                "registry retry what=%r error=%r attempt=%d", what, type(last).__name__, attempt + 1
            )
        assert last is not None
        raise last from last.__cause__


def _refuse_multi_range(headers: Mapping[str, str] | None) -> None:
    # Mirrors and peer caches (Spegel, Dragonfly, distribution's proxy) answer a multi-range
    # request with the whole blob or an error, so only single ranges are ever sent to them.
    for name, value in (headers or {}).items():
        if name.lower() == "range" and "," in value:
            raise ValueError(f"multi-range request {value!r} toward a mirror")


def _safe_challenges(value: str) -> list[Challenge]:
    try:
        return parse_www_authenticate(value)
    except ValueError:
        log.warning("auth unparsable-challenge")
        return []
