"""A layer blob's uncompressed tar, read as a file while its compressed bytes arrive, with both
digests checked at the end: the blob's against the manifest, the tar's against the config's
diff ID. Nothing read from it may be kept unless ``finish`` returns.

gzip is inflated with ISA-L (python-isal): on the startup benchmark's layer it is twice as fast
as zlib (``benchmarks/decompress.py``). zlib is used where isal is not installed. Uncompressed
layers pass through; other compressions are not read here (the unpacker lets containerd apply
them).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from snapshotter.errors import SnapshotterError

GZIP_WBITS = 31  # a gzip header and trailer around deflate
INFLATE_BLOCK = 256 * 1024  # inflated bytes per decompressor call


class LayerDigestError(SnapshotterError):
    """The blob or its tar does not hash to the digest it must have."""


class TruncatedLayerError(SnapshotterError):
    """The compressed stream ended before the end of its gzip member."""


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = 0) -> bytes: ...


def _gzip_decompressor() -> _Decompressor:
    try:
        from isal import isal_zlib  # noqa: PLC0415 - optional and loaded only to unpack
    except ImportError:
        return zlib.decompressobj(GZIP_WBITS)
    return isal_zlib.decompressobj(GZIP_WBITS)


def _hasher(digest: str) -> tuple[hashlib._Hash, str]:
    algorithm, _, expected = digest.partition(":")
    if algorithm not in {"sha256", "sha384", "sha512"} or not expected:
        raise LayerDigestError(f"unsupported digest {digest!r}")
    return hashlib.new(algorithm), expected


class LayerReader:
    """``read`` gives the tar; ``finish`` reads what is left and checks both digests."""

    def __init__(
        self, compressed: Iterable[bytes], *, digest: str, diff_id: str, gzip: bool
    ) -> None:
        self._chunks: Iterator[bytes] = iter(compressed)
        self._digest = digest
        self._diff_id = diff_id
        self._blob_hash, self._blob_expected = _hasher(digest)
        self._tar_hash, self._tar_expected = _hasher(diff_id)
        self._decompressor = _gzip_decompressor() if gzip else None
        self._pending = b""  # compressed input the decompressor has not taken yet
        self._out = memoryview(b"")  # inflated bytes not read yet
        self._ended = False
        self.compressed_bytes = 0
        self.tar_bytes = 0

    def read(self, size: int = -1, /) -> bytes:
        # tarfile reads in small pieces: serve them from one inflated block, so that neither
        # the decompressor nor the caller copies more than it uses.
        while not self._out and not self._ended:
            data = self._produce(INFLATE_BLOCK)
            self._tar_hash.update(data)
            self.tar_bytes += len(data)
            self._out = memoryview(data)
        count = len(self._out) if size < 0 else min(size, len(self._out))
        piece = bytes(self._out[:count])
        self._out = self._out[count:]
        return piece

    def _next_compressed(self) -> bytes | None:
        chunk = next(self._chunks, None)
        if chunk is not None:
            self._blob_hash.update(chunk)
            self.compressed_bytes += len(chunk)
        return chunk

    def _produce(self, limit: int) -> bytes:
        d = self._decompressor
        if d is None:
            chunk = self._next_compressed()
            if chunk is None:
                self._ended = True
                return b""
            return chunk
        if not self._pending:
            chunk = self._next_compressed()
            if chunk is None:
                if not d.eof:
                    raise TruncatedLayerError(f"layer {self._digest}: the gzip stream is cut")
                self._ended = True
                return b""
            self._pending = chunk
        if d.eof:
            # A gzip file may hold several members, one after the other.
            d = self._decompressor = _gzip_decompressor()
        out = d.decompress(self._pending, limit)
        self._pending = d.unused_data if d.eof else d.unconsumed_tail
        return out

    def finish(self) -> None:
        """Drain the stream (tar ends in padding that tarfile leaves unread), then verify."""
        while self.read():
            pass
        blob = self._blob_hash.hexdigest()
        if blob != self._blob_expected:
            raise LayerDigestError(
                f"layer {self._digest}: the downloaded blob hashes to {blob}; nothing was kept"
            )
        tar = self._tar_hash.hexdigest()
        if tar != self._tar_expected:
            raise LayerDigestError(
                f"layer {self._digest} unpacks to {self._diff_id.partition(':')[0]}:{tar}, but "
                f"the image config says {self._diff_id}; nothing was kept"
            )
