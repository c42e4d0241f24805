"""Saved TOC ranges: a restarted daemon re-attaches remote layers without the network.

On first attach the byte ranges the TOC reader asks for, the footer and the TOC, are recorded
and saved in a ``<layer id>.tail`` file under the state root. On restart they are served from
that file, and the registry is contacted only when a file's content is first read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from fusefs import BlobReader, forget_redirect

_MAGIC = b"LZTAIL1\n"
_MAX_TAIL_BYTES = 256 << 20  # a TOC larger than this is refused by the reader's limits anyway


class SavedTocError(Exception):
    """The saved ranges file is missing, truncated or not ours."""


class _WrappedBlob:
    """A blob with the identity of the one it wraps."""

    def __init__(self, inner: BlobReader) -> None:
        self._inner = inner

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def digest(self) -> str:
        return self._inner.digest

    def forget_redirect(self) -> None:
        forget_redirect(self._inner)


class RecordingBlob(_WrappedBlob):
    """Passes reads through and remembers them, so the TOC ranges can be saved."""

    def __init__(self, inner: BlobReader) -> None:
        super().__init__(inner)
        self.ranges: dict[int, bytes] = {}

    async def read_at(self, offset: int, length: int) -> bytes:
        data = await self._inner.read_at(offset, length)
        self.ranges[offset] = data
        return data


class SavedTocBlob(_WrappedBlob):
    """Serves the saved ranges locally; anything else goes to the inner blob."""

    def __init__(self, inner: BlobReader, ranges: dict[int, bytes]) -> None:
        super().__init__(inner)
        self._ranges = sorted(ranges.items())

    async def read_at(self, offset: int, length: int) -> bytes:
        for start, data in self._ranges:
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start : offset - start + length]
        return await self._inner.read_at(offset, length)


class DeferredBlob:
    """A blob whose size and digest are known but whose reader is opened on first use."""

    def __init__(self, digest: str, size: int, opener: Callable[[], Awaitable[BlobReader]]) -> None:
        self._digest = digest
        self._size = size
        self._opener = opener
        self._opened: BlobReader | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def digest(self) -> str:
        return self._digest

    async def read_at(self, offset: int, length: int) -> bytes:
        if self._opened is None:
            self._opened = await self._opener()
        return await self._opened.read_at(offset, length)

    def forget_redirect(self) -> None:
        if self._opened is not None:
            forget_redirect(self._opened)

    @property
    def bytes_read(self) -> int | None:
        """What the opened reader got from the registry (see ``registry_bytes``)."""
        return registry_bytes(self._opened) if self._opened is not None else 0


def registry_bytes(blob: BlobReader) -> int | None:
    """Bytes ``blob`` read from a registry, when it counts them (the registry's reader and
    this deferred one do); None otherwise."""
    value = getattr(blob, "bytes_read", None)
    return value if isinstance(value, int) else None


def save_toc_ranges(path: Path, digest: str, ranges: dict[int, bytes]) -> None:
    spans = [[offset, len(data)] for offset, data in sorted(ranges.items())]
    header = json.dumps({"digest": digest, "ranges": spans}).encode()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        out.write(_MAGIC + struct.pack(">I", len(header)) + header)
        for _, data in sorted(ranges.items()):
            out.write(data)
    tmp.replace(path)  # atomic: a crash leaves the old file or none, never half of one


def load_saved_toc(path: Path, digest: str) -> dict[int, bytes]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SavedTocError(f"{path}: {exc.strerror}") from None
    if len(raw) > _MAX_TAIL_BYTES or not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + 4:
        raise SavedTocError(f"{path}: not a lazysnap tail file")
    (header_len,) = struct.unpack(">I", raw[len(_MAGIC) : len(_MAGIC) + 4])
    start = len(_MAGIC) + 4
    try:
        header = json.loads(raw[start : start + header_len])
        ranges = [(int(o), int(n)) for o, n in header["ranges"]]
        saved_digest = str(header["digest"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SavedTocError(f"{path}: bad header: {exc}") from None
    if saved_digest != digest:
        raise SavedTocError(f"{path}: saved for {saved_digest}, wanted {digest}")
    out: dict[int, bytes] = {}
    position = start + header_len
    for offset, length in ranges:
        if position + length > len(raw):
            raise SavedTocError(f"{path}: truncated")
        out[offset] = raw[position : position + length]
        position += length
    return out
