"""Fixed-size blocks of a cached chunk and their digests, so part of a big chunk can be checked
without hashing all of it (pure).

A chunk's digest covers the whole chunk. Once its bytes have matched that digest, the sha256 of
each ``BLOCK_SIZE`` block is taken from those same bytes; a later read of a few blocks is then
checked against the digests of just those blocks.
"""

from __future__ import annotations

import hashlib

BLOCK_SIZE = 1 << 20
_DIGEST_SIZE = 32


def has_blocks(size: int) -> bool:
    """Whether a chunk of ``size`` bytes is worth reading by block (more than one block)."""
    return size > BLOCK_SIZE


def block_digests(data: bytes | memoryview) -> bytes:
    """The concatenated sha256 digests of ``data``'s blocks (the last one may be short)."""
    view = memoryview(data)
    return b"".join(
        hashlib.sha256(view[start : start + BLOCK_SIZE]).digest()
        for start in range(0, len(view), BLOCK_SIZE)
    )


def covering_blocks(start: int, end: int) -> tuple[int, int]:
    """The byte range ``[first block start, last block end)`` holding ``[start, end)``."""
    first = start - start % BLOCK_SIZE
    last = -(-end // BLOCK_SIZE) * BLOCK_SIZE
    return first, last


def blocks_match(data: bytes | memoryview, first: int, end: int, digests: bytes) -> bool:
    """Whether ``data`` is exactly the chunk's bytes ``[first, end)``: ``first`` is a block
    start, ``end`` a block end or the chunk's end, and each block matches its digest."""
    view = memoryview(data)
    if len(view) != end - first:
        return False  # the file was cut short
    number = first // BLOCK_SIZE
    for start in range(0, len(view), BLOCK_SIZE):
        expected = digests[number * _DIGEST_SIZE : (number + 1) * _DIGEST_SIZE]
        if hashlib.sha256(view[start : start + BLOCK_SIZE]).digest() != expected:
            return False
        number += 1
    return True
