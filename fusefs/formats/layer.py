"""From a located, compressed TOC to a verified LayerIndex. Pure: no I/O."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from fusefs.digest import is_sha256_digest
from fusefs.formats import annotations as keys
from fusefs.formats.builder import build_index
from fusefs.formats.compact import CompactLayerIndex
from fusefs.formats.errors import LayerFormatError
from fusefs.formats.footer import LayerFormat, TocLocation, zstd_location
from fusefs.formats.limits import IndexLimits
from fusefs.formats.tocdata import toc_entries, toc_json_bytes
from fusefs.index import Codec

log = logging.getLogger(__name__)

def _check_digest(value: str, what: str) -> str:
    if not is_sha256_digest(value):
        raise LayerFormatError(f"{what} {value!r} is not a sha256 digest")
    return value


def location_from_annotations(
    annotations: Mapping[str, str] | None, blob_size: int
) -> TocLocation | None:
    """The zstd:chunked TOC position from a layer's annotations, if they give one."""
    if not annotations:
        return None
    for key, fmt in (
        (keys.ZSTD_MANIFEST_POSITION, LayerFormat.ZSTD_CHUNKED),
        (keys.LEGACY_ZSTD_MANIFEST_POSITION, LayerFormat.ZSTD_CHUNKED_LEGACY),
    ):
        value = annotations.get(key)
        if value is None:
            continue
        position = keys.parse_manifest_position(value)
        if position is None:
            raise LayerFormatError(f"annotation {key} = {value!r} is malformed")
        return zstd_location(
            fmt, position.offset, position.length, position.uncompressed_length, blob_size
        )
    return None


@dataclass(frozen=True, slots=True)
class VerifiedToc:
    """A TOC fetched and checked against every digest given for it, not yet indexed.

    Checking is cheap (decompress and hash); indexing is the costly part, which a lazy Prepare
    leaves to a worker after it answered (``build_verified_index``)."""

    location: TocLocation
    data: bytes  # the uncompressed TOC JSON
    json_digest: str
    trusted: bool  # whether it matched a digest from outside the blob (the manifest)
    limits: IndexLimits


def verify_toc(
    location: TocLocation,
    compressed_toc: bytes,
    *,
    toc_digest: str | None = None,
    annotations: Mapping[str, str] | None = None,
    limits: IndexLimits | None = None,
) -> VerifiedToc:
    """Decompress the TOC found at ``location`` and check it against the digests given.

    Digests checked when given: ``toc_digest``, the eStargz ``toc.digest`` annotation, and the
    zstd:chunked manifest-checksum annotations. ``toc_digest`` is the uncompressed TOC JSON's
    sha256. For zstd:chunked the compressed TOC's sha256 is accepted too, because that is what
    its manifest-checksum annotation commits to.
    """
    limits = limits or IndexLimits()
    annotations = annotations or {}
    is_zstd = location.format is not LayerFormat.ESTARGZ
    compressed_digest = "sha256:" + hashlib.sha256(compressed_toc).hexdigest() if is_zstd else ""
    trusted = False  # whether the TOC matched a digest from outside the blob (the manifest)
    if is_zstd:
        for key in (keys.ZSTD_MANIFEST_CHECKSUM, keys.LEGACY_ZSTD_MANIFEST_CHECKSUM):
            expected = annotations.get(key)
            if expected is not None and _check_digest(expected, key) != compressed_digest:
                raise LayerFormatError(
                    f"TOC digest mismatch: {key} is {expected}, TOC has {compressed_digest}"
                )
            trusted = trusted or expected is not None
    data = toc_json_bytes(location, compressed_toc, limits)
    json_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    expected = annotations.get(keys.ESTARGZ_TOC_DIGEST)
    if expected is not None and _check_digest(expected, keys.ESTARGZ_TOC_DIGEST) != json_digest:
        raise LayerFormatError(f"TOC digest mismatch: label {expected}, TOC has {json_digest}")
    trusted = trusted or expected is not None
    if toc_digest is not None:
        _check_digest(toc_digest, "expected TOC digest")
        if toc_digest not in (json_digest, compressed_digest):
            raise LayerFormatError(f"TOC digest mismatch: expected {toc_digest}, got {json_digest}")
        trusted = True
    return VerifiedToc(location, data, json_digest, trusted, limits)


def build_verified_index(toc: VerifiedToc) -> CompactLayerIndex:
    """Index a verified TOC; LayerFormatError for entries that break a rule or a limit."""
    is_zstd = toc.location.format is not LayerFormat.ESTARGZ
    index = build_index(
        toc_entries(toc.data, toc.limits),
        codec=Codec.ZSTD if is_zstd else Codec.GZIP,
        toc_digest=toc.json_digest,
        payload_end=toc.location.payload_end,
        limits=toc.limits,
        toc_trusted=toc.trusted,
    )
    log.debug(
        "layer index built format=%s entries=%d toc_digest=%s",
        toc.location.format.value,
        index.entry_count,
        toc.json_digest,
    )
    return index


def index_from_toc(
    location: TocLocation,
    compressed_toc: bytes,
    *,
    toc_digest: str | None = None,
    annotations: Mapping[str, str] | None = None,
    limits: IndexLimits | None = None,
) -> CompactLayerIndex:
    """Decompress, verify (``verify_toc``) and index the TOC found at ``location``."""
    return build_verified_index(verify_toc(
        location, compressed_toc, toc_digest=toc_digest, annotations=annotations, limits=limits
    ))
