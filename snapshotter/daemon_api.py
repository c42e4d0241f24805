"""What ``Daemon/Resolve`` hands ``lazysnap pull``: an image's documents as plain bytes, the
errors a resolution ends in, and the size limits of the exchange.

Pure on purpose: ``lazysnap pull --snapshotter-address`` imports this before its first RPC, so it
must not pull in trio, httpx or ``registry``. Their imports are most of the CLI's start-up time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from snapshotter.errors import NotFoundError, SnapshotterError

# The registry's own limits: registry.manifest.MAX_MANIFEST_BYTES, and registry.client's
# DEFAULT_MAX_FETCH for the config. They are restated because importing ``registry`` here would
# cost the CLI the import time this module exists to avoid; a unit test keeps them equal.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024 * 1024
# One response carries an index, a manifest and a config, plus names and digests.
MAX_RESOLVE_RESPONSE_BYTES = 2 * MAX_MANIFEST_BYTES + MAX_CONFIG_BYTES + 64 * 1024
MAX_RESOLVE_REQUEST_BYTES = 64 * 1024  # a reference and a platform
MAX_REFERENCE_LENGTH = 4096

# The daemon's bound on one resolution: manifests and config, auth included. The CLI
# waits a little longer so that the daemon's own timeout error is the one it reports.
RESOLVE_TIMEOUT_SECONDS = 30.0
RESOLVE_RPC_TIMEOUT_SECONDS = RESOLVE_TIMEOUT_SECONDS + 15.0


# The trailing metadata key of a failed Resolve that the registry caused: its value is the
# ``kind`` of the ResolveError below. The CLI reads it instead of parsing the message, so a
# message's wording is free to change; a daemon that sends no such key is not a registry failure.
RESOLVE_FAILURE_KEY = "lazysnap-resolve-failure"


@dataclass(frozen=True, slots=True)
class ResolveAnswer:
    """What ``Daemon/Resolve`` answers: an image's documents byte for byte, and the layers whose
    TOC the daemon reads ahead."""

    name: str  # containerd's image name: the normalised reference
    target_media_type: str  # what the name points at: the index, or the manifest
    target_digest: str
    target_content: bytes
    manifest_media_type: str  # the platform manifest; without an index, the target itself
    manifest_digest: str
    manifest_content: bytes
    config: bytes
    read_ahead: tuple[str, ...] = ()  # layer digests

    @property
    def has_index(self) -> bool:
        return self.manifest_digest != self.target_digest


class ResolveError(SnapshotterError):
    """The registry failed the resolution. The message is ``<registry error type>: <text>``,
    what ``lazysnap pull`` prints after the image name when it resolves locally. Older CLIs
    recognise a registry failure by that shape, so it stays."""

    kind: ClassVar[str] = "registry"


class ImageNotFoundError(ResolveError, NotFoundError):
    """No such repository, tag or digest; the message is the registry's text only."""

    kind: ClassVar[str] = "not-found"


class RegistryAuthError(ResolveError):
    """The registry wants credentials the daemon does not have, or refused them."""

    kind: ClassVar[str] = "auth"


class RegistryDeniedError(ResolveError):
    """The credentials are valid but may not pull this repository."""

    kind: ClassVar[str] = "denied"


class ResolveTimeoutError(ResolveError):
    """The registry did not answer in time."""

    kind: ClassVar[str] = "timeout"
