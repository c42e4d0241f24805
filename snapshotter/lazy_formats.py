"""Which layer formats can be served lazily, decided from a descriptor alone (pure).

The decision needs only the layer's media type and annotations, so ``lazysnap inspect`` and the
snapshotter's Prepare path can both make it without a network round trip.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from snapshotter.labels import (
    ESTARGZ_TOC_DIGEST,
    LEGACY_ZSTD_CHUNKED_CHECKSUM,
    LEGACY_ZSTD_CHUNKED_POSITION,
    ZSTD_CHUNKED_CHECKSUM,
    ZSTD_CHUNKED_POSITION,
)

# "soci": a plain gzip layer with a zTOC in the image's SOCI index. The descriptor alone never
# says so; ``classify_layer`` tells which layers may have one (``plain_gzip``).
LazyFormat = Literal["estargz", "zstd:chunked", "soci"]

_GZIP_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
_ZSTD_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)
_UNCOMPRESSED_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)


@dataclass(frozen=True, slots=True)
class LayerClassification:
    """``format`` is the lazy format to read the layer with, or None; ``reason`` says why."""

    format: LazyFormat | None
    reason: str

    @property
    def lazy(self) -> bool:
        return self.format is not None


def _base_media_type(media_type: str) -> str:
    # Media types may carry parameters ("...; charset=..."); compare the bare type.
    return media_type.split(";", 1)[0].strip().lower()


def _zstd_chunked_keys(annotations: Mapping[str, str]) -> tuple[str, str] | None:
    """The (checksum, position) keys present, current names preferred over legacy ones."""
    for checksum, position in (
        (ZSTD_CHUNKED_CHECKSUM, ZSTD_CHUNKED_POSITION),
        (LEGACY_ZSTD_CHUNKED_CHECKSUM, LEGACY_ZSTD_CHUNKED_POSITION),
    ):
        if annotations.get(checksum) and annotations.get(position):
            return checksum, position
    return None


# The rule of fusefs.formats.annotations.parse_manifest_position, restated because the CLI must
# not import fusefs; tests/test_format_facts.py runs one table of vectors against both.
_POSITION = re.compile(r"([0-9]{1,19}):([0-9]{1,19}):([0-9]{1,19}):1")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def valid_manifest_position(value: str) -> bool:
    """``<offset>:<compressed length>:<uncompressed length>:1``, as containers/storage reads it:
    four ASCII decimal fields, manifest type 1, and a TOC that is not empty."""
    match = _POSITION.fullmatch(value)
    return match is not None and int(match.group(2)) > 0


def valid_sha256_digest(value: str) -> bool:
    return _SHA256.fullmatch(value) is not None


def plain_gzip(media_type: str, annotations: Mapping[str, str]) -> bool:
    """A gzip layer without an eStargz TOC: lazily readable only through a SOCI index."""
    return _base_media_type(media_type) in _GZIP_TYPES and not annotations.get(ESTARGZ_TOC_DIGEST)


def classify_layer(media_type: str, annotations: Mapping[str, str]) -> LayerClassification:
    """Decide whether a layer with this descriptor can be mounted lazily, and in which format."""
    base = _base_media_type(media_type)
    if base in _ZSTD_TYPES:
        keys = _zstd_chunked_keys(annotations)
        if keys is None:
            return LayerClassification(None, "zstd layer without zstd:chunked TOC annotations")
        checksum_key, position_key = keys
        if not valid_sha256_digest(annotations[checksum_key]):
            return LayerClassification(None, f"malformed {checksum_key} annotation")
        if not valid_manifest_position(annotations[position_key]):
            return LayerClassification(None, f"malformed {position_key} annotation")
        legacy = (
            " (legacy annotation names)" if checksum_key == LEGACY_ZSTD_CHUNKED_CHECKSUM else ""
        )
        return LayerClassification("zstd:chunked", f"zstd:chunked TOC annotations{legacy}")
    if base in _GZIP_TYPES:
        toc_digest = annotations.get(ESTARGZ_TOC_DIGEST)
        if not toc_digest:
            return LayerClassification(None, "gzip layer without eStargz TOC digest annotation")
        if not valid_sha256_digest(toc_digest):
            return LayerClassification(None, f"malformed {ESTARGZ_TOC_DIGEST} annotation")
        return LayerClassification("estargz", "eStargz TOC digest annotation")
    if base in _UNCOMPRESSED_TYPES:
        return LayerClassification(None, "uncompressed tar layer has no seekable TOC")
    return LayerClassification(None, f"media type {media_type!r} is not a lazily readable layer")


Compression = Literal["gzip", "zstd", "none"]


def layer_compression(media_type: str) -> Compression | None:
    """How a layer blob of this media type is compressed; None for a type that is not a layer
    tar lazysnap knows."""
    base = _base_media_type(media_type)
    if base in _GZIP_TYPES:
        return "gzip"
    if base in _ZSTD_TYPES:
        return "zstd"
    if base in _UNCOMPRESSED_TYPES:
        return "none"
    return None
