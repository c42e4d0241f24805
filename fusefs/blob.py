"""What the filesystem needs from a layer blob: its size, its digest, and ranged reads.

The registry's blob reader satisfies this structurally (fusefs never imports registry); a local
file satisfies it through ``LocalFileBlob`` for ``lazysnap mount --blob`` and for tests.
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

        Raises an exception (never returns short data) when the range cannot be read; the
        filesystem maps any exception to EIO for the reader.
        """
        ...
