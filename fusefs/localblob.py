"""``LocalFileBlob``: a layer blob in a local file, read with ``pread`` on worker threads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import trio

_HASH_BLOCK = 1 << 20


class LocalFileBlob:
    """Satisfies ``fusefs.BlobReader``. ``await LocalFileBlob.open(path)`` hashes the file off the
    trio thread when no digest is given; the constructor hashes synchronously."""

    def __init__(self, path: Path, digest: str | None = None) -> None:
        self._path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(self._fd).st_size
            self._digest = digest if digest is not None else self._hash()
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    async def open(cls, path: Path, digest: str | None = None) -> LocalFileBlob:
        return await trio.to_thread.run_sync(cls, path, digest)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def digest(self) -> str:
        return self._digest

    async def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(
                f"range {offset}+{length} outside blob {self._path} of {self._size} bytes"
            )
        if length == 0:
            return b""
        data = await trio.to_thread.run_sync(self._pread, offset, length)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pread(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        done = 0
        while done < length:
            part = os.pread(self._fd, length - done, offset + done)
            if not part:
                raise EOFError(f"{self._path} ended at {offset + done}, wanted {offset + length}")
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _hash(self) -> str:
        hasher = hashlib.sha256()
        offset = 0
        while offset < self._size:
            block = os.pread(self._fd, _HASH_BLOCK, offset)
            if not block:
                break
            hasher.update(block)
            offset += len(block)
        return "sha256:" + hasher.hexdigest()
