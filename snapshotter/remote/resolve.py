"""``Daemon/Resolve``, the daemon's side: resolve an image with the daemon's warm registry client,
then start reading its lazy layers' TOCs before answering.

``lazysnap pull --snapshotter-address`` uses it instead of a registry client of its own, because
the CLI's imports and TLS set-up cost more than the daemon's whole resolution. The read-ahead
replaces the separate ``Daemon/PrepareAhead`` round trip.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio

from registry import (
    AuthenticationError,
    AuthorizationError,
    CredentialProvider,
    CredentialsError,
    NotFoundError,
    Reference,
    RegistryClient,
    RegistryError,
    RegistryTimeoutError,
    host_platform,
    parse_platform,
    parse_reference,
)
from snapshotter.client.documents import ImageDocuments, fetch_documents
from snapshotter.daemon_api import (
    MAX_REFERENCE_LENGTH,
    RESOLVE_TIMEOUT_SECONDS,
    ImageNotFoundError,
    RegistryAuthError,
    RegistryDeniedError,
    ResolveAnswer,
    ResolveError,
    ResolveTimeoutError,
)
from snapshotter.errors import InvalidArgumentError

log = logging.getLogger(__name__)

# The one registry -> domain error table of Daemon/Resolve; the gRPC edge then maps the domain
# errors to status codes. The most specific class wins, whatever the order here.
DOMAIN_ERROR_OF: dict[type[RegistryError], type[ResolveError]] = {
    RegistryError: ResolveError,
    NotFoundError: ImageNotFoundError,
    AuthenticationError: RegistryAuthError,
    CredentialsError: RegistryAuthError,
    AuthorizationError: RegistryDeniedError,
    RegistryTimeoutError: ResolveTimeoutError,
}


def _domain_class(exc: RegistryError) -> type[ResolveError]:
    found: type[RegistryError] = RegistryError
    for source in DOMAIN_ERROR_OF:
        if isinstance(exc, source) and issubclass(source, found):
            found = source
    return DOMAIN_ERROR_OF[found]


def _message(exc: RegistryError, domain: type[ResolveError]) -> str:
    if issubclass(domain, ImageNotFoundError):
        return str(exc)
    # The registry's error texts name hosts, repositories and status codes, never credentials;
    # the type name is what a local pull prints before them.
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def map_registry_errors() -> Iterator[None]:
    """Turn registry errors into the domain errors of ``DOMAIN_ERROR_OF``,
    chained with ``from``; anything else passes unchanged."""
    try:
        yield
    except RegistryError as exc:
        domain = _domain_class(exc)
        raise domain(_message(exc, domain)) from exc


async def fetch_image_documents(
    client: RegistryClient, image: str, platform: str
) -> ImageDocuments:
    """``fetch_documents`` with the daemon's bounds, its errors turned into domain errors that
    the gRPC edge maps to status codes. The CLI turns those back into its usual messages."""
    if not image or len(image) > MAX_REFERENCE_LENGTH:
        raise InvalidArgumentError(f"image reference must be 1..{MAX_REFERENCE_LENGTH} characters")
    try:
        ref = parse_reference(image)
        chosen = parse_platform(platform) if platform else host_platform()
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    with map_registry_errors():
        try:
            with trio.fail_after(RESOLVE_TIMEOUT_SECONDS):
                return await fetch_documents(client, ref, chosen)
        except trio.TooSlowError:
            raise RegistryTimeoutError(
                f"registry did not answer within {RESOLVE_TIMEOUT_SECONDS:.0f}s"
            ) from None


async def check_access(
    client: RegistryClient,
    credentials: CredentialProvider,
    registry: str,
    ref: Reference | None,
) -> None:
    """Raise a domain error unless ``registry`` lets ``credentials`` read ``ref`` (or, without
    one, log in). A client of its own asks: the daemon's client may hold tokens that would
    let a request succeed whatever the new credentials are."""
    with map_registry_errors():
        try:
            with trio.fail_after(RESOLVE_TIMEOUT_SECONDS):
                async with client.with_credentials(credentials) as probe:
                    await probe.check_access(registry, ref)
        except trio.TooSlowError:
            raise RegistryTimeoutError(
                f"registry did not answer within {RESOLVE_TIMEOUT_SECONDS:.0f}s"
            ) from None


def answer_from_documents(image: ImageDocuments, read_ahead: tuple[str, ...]) -> ResolveAnswer:
    return ResolveAnswer(
        name=image.name,
        target_media_type=image.target.media_type,
        target_digest=image.target.digest,
        target_content=image.target_content,
        manifest_media_type=image.manifest.media_type,
        manifest_digest=image.manifest_digest,
        manifest_content=image.manifest_content,
        config=image.config,
        read_ahead=read_ahead,
    )
