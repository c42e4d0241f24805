"""``Daemon/Resolve``, the daemon's side: resolve an image with the daemon's warm registry client,
then start reading its lazy layers' TOCs before answering.

``lazysnap pull --snapshotter-address`` uses it instead of a registry client of its own (the
CLI's imports and TLS set-up cost more than the daemon's whole resolution), and the read-ahead
replaces the separate ``Daemon/PrepareAhead`` round trip.
"""

from __future__ import annotations

import logging

import trio

from registry import (
    AuthenticationError,
    AuthorizationError,
    CredentialsError,
    NotFoundError,
    RegistryClient,
    RegistryError,
    RegistryTimeoutError,
    host_platform,
    parse_platform,
    parse_reference,
)
from snapshotter.client.pull import ImageDocuments, fetch_documents
from snapshotter.client.unpacker import UnpackError
from snapshotter.daemon_api import (
    MAX_REFERENCE_LENGTH,
    RESOLVE_TIMEOUT_SECONDS,
    ImageNotFoundError,
    RegistryAuthError,
    RegistryDeniedError,
    ResolvedImage,
    ResolveError,
    ResolveTimeoutError,
)
from snapshotter.errors import FailedPreconditionError, InvalidArgumentError

log = logging.getLogger(__name__)


async def fetch_image_documents(
    client: RegistryClient, image: str, platform: str
) -> ImageDocuments:
    """``fetch_documents`` with the daemon's bounds, its errors turned into domain errors that
    the gRPC edge maps to status codes (the CLI turns those back into its usual messages)."""
    if not image or len(image) > MAX_REFERENCE_LENGTH:
        raise InvalidArgumentError(f"image reference must be 1..{MAX_REFERENCE_LENGTH} characters")
    try:
        ref = parse_reference(image)
        chosen = parse_platform(platform) if platform else host_platform()
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    try:
        with trio.fail_after(RESOLVE_TIMEOUT_SECONDS):
            return await fetch_documents(client, ref, chosen)
    except trio.TooSlowError:
        raise ResolveTimeoutError(
            f"RegistryTimeoutError: registry did not answer within {RESOLVE_TIMEOUT_SECONDS:.0f}s"
        ) from None
    except NotFoundError as exc:
        raise ImageNotFoundError(str(exc)) from exc
    except (AuthenticationError, CredentialsError) as exc:
        raise RegistryAuthError(_described(exc)) from exc
    except AuthorizationError as exc:
        raise RegistryDeniedError(_described(exc)) from exc
    except RegistryTimeoutError as exc:
        raise ResolveTimeoutError(_described(exc)) from exc
    except RegistryError as exc:
        raise ResolveError(_described(exc)) from exc
    except UnpackError as exc:  # e.g. the platform's entry is not an image manifest
        raise FailedPreconditionError(str(exc)) from exc


def _described(exc: RegistryError) -> str:
    # The registry's error texts name hosts, repositories and status codes, never credentials.
    return f"{type(exc).__name__}: {exc}"


def resolved_from_documents(image: ImageDocuments, read_ahead: tuple[str, ...]) -> ResolvedImage:
    return ResolvedImage(
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
