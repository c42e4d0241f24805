"""Compressed bytes of a zTOC layer that readers already fetched, kept for background fetch.

A plain gzip layer served through a zTOC is verified by hashing the whole blob. Readers fetch
whole compressed spans but keep only inflated spans and chunks, so without this copy the
background fetch would download their bytes a second time. The copy is an unlinked temporary
file next to the chunk cache, bounded by the blob size, gone when it is closed or the process
ends. Bytes read back from it are hashed into the blob digest like fetched ones, so a changed
copy fails the blob check instead of passing unnoticed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# Held pieces shorter than this are fetched again with the gaps around them: one request
# fewer is worth more than a few KiB on the link.
MIN_PIECE = 32 * 1024


class HeldBytes:
    """A sparse copy of parts of one blob and the byte intervals it holds."""

    def __init__(self, directory: Path, blob_size: int) -> None:
        # Closed by ``close``, not by a with block: it lives as long as the background fetch.
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115
        self._blob_size = blob_size
        self._intervals: list[tuple[int, int]] = []  # sorted, disjoint, not touching
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return sum(end - start for start, end in self._intervals)

    async def keep(self, start: int, data: bytes) -> None:
        """Keep ``data``, the blob's bytes from ``start`` on; marked held once written. A failed
        write only stops the keeping: the blob check then fetches those bytes again."""
        if not data or start < 0 or start + len(data) > self._blob_size:
            return
        try:
            written = await trio.to_thread.run_sync(self._write, start, data)
        except OSError as exc:
            log.warning("keeping fetched bytes failed, they will be fetched again error=%r", exc)
            self.close()
            return
        if written:
            self._mark(start, start + len(data))

    def holds(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self._intervals)

    def pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """The held parts of ``[start, end)``, in blob order: what a range held only in part
        need not fetch again."""
        return [
            (max(s, start), min(e, end)) for s, e in self._intervals if s < end and e > start
        ]

    async def read(self, start: int, end: int) -> bytes | None:
        """The bytes of ``[start, end)`` when all of them are held, else None."""
        if not self.holds(start, end):
            return None
        try:
            data = await trio.to_thread.run_sync(self._read, start, end - start)
        except OSError as exc:
            log.warning("reading kept bytes failed, they will be fetched error=%r", exc)
            return None
        return data if data is not None and len(data) == end - start else None

    async def read_with_gaps(
        self, start: int, end: int, fetch: Callable[[int, int], Awaitable[bytes]]
    ) -> tuple[bytes, int]:
        """The blob's bytes ``[start, end)``: held pieces read back, the gaps between them
        (and any piece that cannot be read back) from ``fetch(start, end)``. Returns the bytes
        and how many of them came from the copy. Nothing here is trusted: the caller hashes
        all of it into the blob digest, so a changed copy fails the blob check."""
        parts: list[bytes] = []
        reused = 0
        at = start
        for s, e in self.pieces(start, end):
            if e - s < MIN_PIECE:
                continue  # fetched with the gap around it
            if at < s:
                parts.append(await fetch(at, s))
            data = await self.read(s, e)
            if data is None:  # closed or failed meanwhile
                data = await fetch(s, e)
            else:
                reused += len(data)
            parts.append(data)
            at = e
        if at < end:
            parts.append(await fetch(at, end))
        return b"".join(parts), reused

    def close(self) -> None:
        """Drop the copy. The lock keeps a worker thread from using the descriptor once it is
        closed, when the number may already name another file."""
        with self._lock:
            self._intervals = []
            self._file.close()

    def _write(self, start: int, data: bytes) -> bool:
        with self._lock:
            if self._file.closed:
                return False
            view = memoryview(data)
            while view:
                done = os.pwrite(self._file.fileno(), view, start)
                view, start = view[done:], start + done
            return True

    def _read(self, start: int, length: int) -> bytes | None:
        with self._lock:
            if self._file.closed:
                return None
            return os.pread(self._file.fileno(), length, start)

    def _mark(self, start: int, end: int) -> None:
        kept: list[tuple[int, int]] = []
        for s, e in self._intervals:
            if e < start or s > end:
                kept.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        kept.append((start, end))
        self._intervals = sorted(kept)
