"""The registry package's one exception hierarchy.

Every failure that leaves ``registry`` is a ``RegistryError``; httpx exceptions are translated at
the edge and chained with ``from``. Messages carry the registry's OCI error codes and messages
but never credentials: nothing secret is ever passed into these constructors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OCIErrorDetail:
    """One entry of an OCI distribution error body: ``{"errors": [{"code", "message"}]}``."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class RegistryError(Exception):
    """Base of every error raised by the registry client."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        url: str | None = None,
        details: Sequence[OCIErrorDetail] = (),
    ) -> None:
        self.message = message
        self.status = status
        self.url = url
        self.details: tuple[OCIErrorDetail, ...] = tuple(details)
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status})")
        if self.details:
            parts.append("registry said: " + "; ".join(str(d) for d in self.details))
        return " ".join(parts)


class InvalidReferenceError(RegistryError, ValueError):
    """An image reference that cannot be parsed."""


class HostsConfigError(RegistryError, ValueError):
    """A hosts.toml or certs.d directory that cannot be used."""


class CredentialsError(RegistryError):
    """docker config.json or a credential helper could not provide credentials."""


class AuthenticationError(RegistryError):
    """The registry refused our credentials: a 401 after authenticating, or a failed token fetch."""


class AuthorizationError(RegistryError):
    """The registry knows who we are but denies access (403)."""


class NotFoundError(RegistryError):
    """The repository, manifest or blob does not exist (404)."""


class RangeNotSatisfiableError(RegistryError):
    """The requested byte range lies outside the blob, by a 416 or by a local check."""


class RangeNotSupportedError(RegistryError):
    """The server answered a ranged GET with the whole body (200): it cannot serve ranges."""


class TransportError(RegistryError):
    """Connecting, sending or receiving failed (after retries), or a body was truncated."""


class RegistryTimeoutError(TransportError):
    """A connect, read or total deadline passed (after retries)."""


class ServerError(RegistryError):
    """The registry kept answering 5xx or 429 until the retries ran out."""


class ProtocolError(RegistryError):
    """The registry answered something the distribution protocol does not allow."""


class ManifestError(RegistryError):
    """A manifest or index that cannot be parsed or has an unsupported media type."""


class PlatformNotFoundError(ManifestError):
    """An image index has no manifest for the requested platform."""


class DigestMismatchError(RegistryError):
    """Content whose sha256 is not the digest it was asked for."""


class UnsupportedDigestError(RegistryError, ValueError):
    """A digest whose algorithm we cannot verify, or that is malformed."""
