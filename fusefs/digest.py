"""The one sha256 digest check of fusefs (pure).

TOC fields, layer annotations and chunk cache keys all name content by ``sha256:<64 lowercase
hex>``; anything else is refused rather than normalised, because a digest that is read two ways
could name two contents.
"""

from __future__ import annotations

import re

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


def sha256_hex(value: str) -> str | None:
    """The hex part of a ``sha256:<hex>`` digest, or None when ``value`` is not one."""
    match = _SHA256.fullmatch(value)
    return match.group(1) if match is not None else None


def sha256_raw(value: object) -> bytes | None:
    """The 32 raw bytes of a ``sha256:<hex>`` digest, or None when ``value`` is not one."""
    # No regex: this runs once per file of a TOC, and this is 2-3x faster. bytes.fromhex also
    # takes uppercase and blanks, so its result must turn back into exactly the same hex.
    if not isinstance(value, str) or len(value) != 71 or not value.startswith("sha256:"):
        return None
    hex_part = value[7:]
    try:
        raw = bytes.fromhex(hex_part)
    except ValueError:
        return None
    return raw if raw.hex() == hex_part else None


def is_sha256_digest(value: object) -> bool:
    return isinstance(value, str) and sha256_hex(value) is not None
