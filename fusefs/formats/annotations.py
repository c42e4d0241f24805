"""Layer-descriptor annotation keys of the seekable formats, and the rule of their values (pure).

fusefs owns these for itself because it imports nothing of ``snapshotter``; the snapshotter's
``snapshotter/labels.py`` names the same keys, and a unit test keeps the two equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Set by eStargz producers: the sha256 of the uncompressed TOC JSON.
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
# Set by zstd:chunked producers: the sha256 of the compressed TOC, and where the TOC lies.
ZSTD_MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ZSTD_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
# The same facts under the names stargz-snapshotter's zstd:chunked converter writes.
LEGACY_ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"

# containers/storage reads the position with Sscanf("%d:%d:%d:%d") and then requires manifest
# type 1, so a three-field value fails there; it fails here too. 19 digits bound the fields to
# what a 64-bit offset can hold.
_POSITION = re.compile(r"([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19}):1")


@dataclass(frozen=True, slots=True)
class ManifestPosition:
    offset: int
    length: int  # compressed, never 0
    uncompressed_length: int


def parse_manifest_position(value: str) -> ManifestPosition | None:
    """``<offset>:<compressed length>:<uncompressed length>:1``, or None when malformed."""
    match = _POSITION.fullmatch(value)
    if match is None:
        return None
    offset, length, uncompressed = (int(field) for field in match.groups())
    if length == 0:
        return None
    return ManifestPosition(offset, length, uncompressed)
