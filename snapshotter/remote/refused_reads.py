"""Lazy reads the registry refuses: a log line naming the image, then the error, which the
filesystem answers with EIO.

By the time a refusal reaches here the registry client has already looked the credentials up
again, past every cache, and retried once: a 401 or 403 now means the credentials lazysnap can
find do not let this node read the image. The filesystem knows blobs only by digest, so this
wrapper, made where the layer is attached, carries the image name for the operator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fusefs import BlobReader, forget_redirect
from registry import AuthenticationError, AuthorizationError, CredentialsError

log = logging.getLogger(__name__)

# A container reading a refused layer fails many reads at once: one line per blob and interval.
LOG_INTERVAL_SECONDS = 30.0


class ImageNamedBlob:
    """A blob reader that logs the image when the registry refuses a read of it."""

    def __init__(
        self, inner: BlobReader, image_ref: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._inner = inner
        self._image_ref = image_ref
        self._clock = clock
        self._last_logged: float | None = None

    def __repr__(self) -> str:
        return f"ImageNamedBlob({self._image_ref}, {self._inner!r})"

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def digest(self) -> str:
        return self._inner.digest

    def forget_redirect(self) -> None:
        forget_redirect(self._inner)

    async def read_at(self, offset: int, length: int) -> bytes:
        try:
            return await self._inner.read_at(offset, length)
        except (AuthenticationError, AuthorizationError, CredentialsError) as exc:
            now = self._clock()
            if self._last_logged is None or now - self._last_logged >= LOG_INTERVAL_SECONDS:
                self._last_logged = now
                log.error(
                    "lazy read refused by the registry after looking the credentials up "
                    "again; the read fails with EIO",
                    extra={"event": "lazy_read_refused", "image": self._image_ref,
                           "digest": self._inner.digest,
                           "status": getattr(exc, "status", None),
                           "error": type(exc).__name__},
                )
            raise
