"""A layer blob written in ranges, in any order, into a local file and read back in order.

Downloads land wherever their range belongs (``write_at``); readers follow the watermark, the
end of the part with no holes, so that decompression starts with the first range and never
waits for the whole blob. Several readers may follow one spool: the unpacker and the writer of
containerd's content store each read it once. Nothing here verifies bytes; readers do.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from snapshotter.errors import SnapshotterError

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024


class SpoolError(SnapshotterError):
    """The blob could not be downloaded; the message says why."""


class Spool:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._cond = threading.Condition()
        self._finished: dict[int, int] = {}  # start -> end of ranges written past the watermark
        self._watermark = 0
        self._generation = 0  # bumped when a whole download replaces the file
        self._failure: BaseException | None = None
        self._closed = False
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    @property
    def watermark(self) -> int:
        with self._cond:
            return self._watermark

    @property
    def settled(self) -> bool:
        """Complete or failed: nothing more will be written."""
        with self._cond:
            return self._failure is not None or self._watermark >= self.size

    def write_at(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise SpoolError(f"range {offset}+{len(data)} outside a blob of {self.size} bytes")
        with self._cond:
            # Under the lock: ``close`` may not free the descriptor while it is written to.
            if self._closed:
                raise SpoolError("the spool is closed")
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, memoryview(data)[written:], offset + written)
            self._finished[offset] = offset + len(data)
            while self._watermark in self._finished:
                self._watermark = self._finished.pop(self._watermark)
            self._cond.notify_all()

    def replace_whole(self, path: Path) -> None:
        """Take ``path``, the whole blob downloaded in one stream, as the spool's content."""
        with self._cond:
            os.replace(path, self.path)
            self._generation += 1
            self._finished.clear()
            self._watermark = self.size
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Wake every reader with ``error``; the first failure is the one reported."""
        with self._cond:
            if self._failure is None and self._watermark < self.size:
                self._failure = error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def _wait_past(self, offset: int) -> tuple[int, int]:
        with self._cond:
            while self._watermark <= offset and self._failure is None:
                self._cond.wait()
            if self._watermark <= offset:
                # The download's own error, such as the registry's NotFoundError, so that the
                # caller reports it as it reports any other pull's.
                assert self._failure is not None
                raise self._failure
            return self._watermark, self._generation

    def chunks(self, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The blob from its start, in order, as fast as the download goes."""
        offset = 0
        fd = -1
        opened = -1
        try:
            while offset < self.size:
                watermark, generation = self._wait_past(offset)
                if generation != opened:
                    # A whole download replaced the file: read the new one from here on.
                    if fd >= 0:
                        os.close(fd)
                    fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                    opened = generation
                length = min(chunk_size, watermark - offset)
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise SpoolError(f"spool {self.path} is shorter than its watermark")
                offset += length
                yield data
        finally:
            if fd >= 0:
                os.close(fd)


def plan_ranges(size: int, range_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every range of a ``size``-byte blob, in order."""
    if range_size <= 0:
        raise ValueError("range_size must be positive")
    return [(offset, min(range_size, size - offset)) for offset in range(0, size, range_size)]
