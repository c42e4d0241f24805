"""A persisted high-water mark of layer slots, so no slot is reused while a connection lives.

The kernel caches inode numbers, attributes and pages of a FUSE mount for as long as the
connection lives, and that can be longer than one daemon: a restarted daemon takes the
connection over. A slot handed to a different layer would give that layer's files the inode
numbers of the old one's, and the kernel could serve the old attributes or pages for them. So
slots are reserved on disk before use, in blocks to keep writes rare, and a new table starts
above everything ever reserved.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

RESERVE_BLOCK = 64  # slots reserved per write; a few billion are available


class SlotMarkError(Exception):
    """The mark file cannot be read or written."""


class SlotMark:
    def __init__(self, path: Path, *, fresh_connection: bool) -> None:
        """``fresh_connection``: the kernel holds nothing of this mount yet, so an unreadable
        mark can start over; on a connection taken over it is an error."""
        self._path = path
        try:
            self._reserved = self._load()
        except SlotMarkError:
            if not fresh_connection:
                raise
            self._reserved = 0

    def _load(self) -> int:
        try:
            text = self._path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise SlotMarkError(f"cannot read slot mark {self._path}: {exc}") from exc
        if not text.isdigit():
            raise SlotMarkError(f"slot mark {self._path} is not a number: {text[:20]!r}")
        return int(text)

    @property
    def first_unreserved(self) -> int:
        """Every slot below this may have been handed out before."""
        return self._reserved + 1

    def reserve(self, slot: int) -> None:
        """Make sure ``slot`` is covered by the mark on disk before it is used."""
        if slot <= self._reserved:
            return
        ceiling = slot + RESERVE_BLOCK - 1
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{ceiling}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SlotMarkError(f"cannot write slot mark {self._path}: {exc}") from exc
        self._reserved = ceiling
