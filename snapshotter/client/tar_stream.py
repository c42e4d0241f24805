"""A stream read as a forward-only file, for ``tarfile``'s random-access mode (``"r:"``).

``tarfile``'s stream mode (``"r|"``) buffers through ``_Stream``, which copies what is left of
its buffer at every read, once per 512-byte header and per small file: on the startup
benchmark's layer (8,000 entries) that was a large part of the unpack's Python time. The
random-access mode only needs ``read``, ``tell`` and ``seek``, and on a tar read from start to
end it only ever seeks forward (over padding and unread data), which this serves by reading
and dropping. A seek backwards is an error, as in stream mode.
"""

from __future__ import annotations

from typing import Protocol

from snapshotter.errors import SnapshotterError

READ_SIZE = 256 * 1024  # asked of the stream at once (LayerReader inflates that much a call)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class BackwardSeekError(SnapshotterError):
    """A tar whose next header lies before what was already read: not a tar this reads."""


class ForwardReader:
    def __init__(self, stream: Readable) -> None:
        self._stream = stream
        self._buffer = b""
        self._start = 0  # index in _buffer of the next byte: nothing is copied to drop bytes
        self._position = 0  # offset in the stream of the next byte

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0, /) -> int:
        if whence != 0 or offset < self._position:
            raise BackwardSeekError(
                f"tar: seek to {offset} (whence {whence}) from {self._position}, backwards"
            )
        while offset > self._position:
            if not self.read(min(offset - self._position, READ_SIZE)):
                break  # the end: tarfile's next read finds nothing and says so
        return self._position

    def read(self, size: int = -1, /) -> bytes:
        """``size`` bytes, fewer only at the end of the stream; everything left for -1."""
        end = self._start + size
        if 0 <= size <= len(self._buffer) - self._start:  # the common case: headers, small files
            piece = self._buffer[self._start:end]
            self._start = end
            self._position += size
            return piece
        parts = [self._buffer[self._start:]]
        have = len(parts[0])
        self._buffer, self._start = b"", 0
        while size < 0 or have < size:
            chunk = self._stream.read(READ_SIZE)
            if not chunk:
                break
            if size >= 0 and have + len(chunk) > size:
                keep = size - have
                parts.append(chunk[:keep])
                self._buffer, self._start = chunk, keep
                have = size
                break
            parts.append(chunk)
            have += len(chunk)
        self._position += have
        return b"".join(parts)
