"""Give the heap freed by a TOC parse back to the operating system.

Parsing a large TOC allocates and frees tens of MB: the decompressed JSON, its decoded text,
and one entry's objects at a time. glibc keeps freed heap memory mapped while its dynamically
raised trim threshold is not reached. Without a trim the daemon's RSS would stay at the
parse's peak although the index itself is small.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_heap() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
