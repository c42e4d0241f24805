"""What the filesystem needs from a layer blob: its size, its digest, and ranged reads.

The registry's blob reader satisfies this structurally, since fusefs never imports registry. A
local file satisfies it through ``LocalFileBlob`` for ``lazysnap mount --blob`` and for tests.

A reader may also offer ``forget_redirect()``: the registry's reader reuses the object storage
URL a registry redirected it to, and bytes from there that fail verification mean the next read
should ask the registry again. ``forget_redirect(blob)`` calls it when the reader has it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BlobReader(Protocol):
    """Random access to one compressed layer blob."""

    @property
    def size(self) -> int:
        """Total size of the blob in bytes."""
        ...

    @property
    def digest(self) -> str:
        """The blob's content digest, ``sha256:<hex>``."""
        ...

    async def read_at(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes starting at ``offset``.

        Raises an exception when the range cannot be read, and never returns short data. The
        filesystem maps any exception to EIO for the reader.
        """
        ...


@runtime_checkable
class RedirectingBlobReader(BlobReader, Protocol):
    """A blob reader that reuses a redirect target and can be told to stop."""

    def forget_redirect(self) -> None:
        """Ask the origin again on the next read instead of reusing where it sent us."""
        ...


def forget_redirect(blob: BlobReader) -> None:
    """After bytes from ``blob`` failed verification: drop its redirect target, if it has one."""
    if isinstance(blob, RedirectingBlobReader):
        blob.forget_redirect()
