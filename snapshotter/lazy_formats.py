"""Which layer formats can be served lazily, decided from a descriptor alone (pure).

The decision needs only the layer's media type and annotations, so ``lazysnap inspect`` and the
snapshotter's Prepare path can both make it without a network round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

LazyFormat = Literal["estargz", "zstd:chunked"]

ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ZSTD_CHUNKED_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_POSITION = "io.github.containers.zstd-chunked.manifest-position"
LEGACY_ZSTD_CHUNKED_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_ZSTD_CHUNKED_POSITION = "io.containers.zstd-chunked.manifest-position"

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


def _valid_position(value: str) -> bool:
    # "<offset>:<compressedLen>:<uncompressedLen>:<type>", all decimal.
    parts = value.split(":")
    return len(parts) == 4 and all(p.isdigit() for p in parts) and int(parts[1]) > 0


def _valid_sha256(value: str) -> bool:
    prefix, _, hexpart = value.partition(":")
    return (
        prefix == "sha256" and len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)
    )


def classify_layer(media_type: str, annotations: Mapping[str, str]) -> LayerClassification:
    """Decide whether a layer with this descriptor can be mounted lazily, and in which format."""
    base = _base_media_type(media_type)
    if base in _ZSTD_TYPES:
        keys = _zstd_chunked_keys(annotations)
        if keys is None:
            return LayerClassification(None, "zstd layer without zstd:chunked TOC annotations")
        checksum_key, position_key = keys
        if not _valid_sha256(annotations[checksum_key]):
            return LayerClassification(None, f"malformed {checksum_key} annotation")
        if not _valid_position(annotations[position_key]):
            return LayerClassification(None, f"malformed {position_key} annotation")
        legacy = (
            " (legacy annotation names)" if checksum_key == LEGACY_ZSTD_CHUNKED_CHECKSUM else ""
        )
        return LayerClassification("zstd:chunked", f"zstd:chunked TOC annotations{legacy}")
    if base in _GZIP_TYPES:
        toc_digest = annotations.get(ESTARGZ_TOC_DIGEST)
        if not toc_digest:
            return LayerClassification(None, "gzip layer without eStargz TOC digest annotation")
        if not _valid_sha256(toc_digest):
            return LayerClassification(None, f"malformed {ESTARGZ_TOC_DIGEST} annotation")
        return LayerClassification("estargz", "eStargz TOC digest annotation")
    if base in _UNCOMPRESSED_TYPES:
        return LayerClassification(None, "uncompressed tar layer has no seekable TOC")
    return LayerClassification(None, f"media type {media_type!r} is not a lazily readable layer")
