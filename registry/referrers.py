"""The manifests that refer to a manifest (OCI distribution 1.1 referrers), parsed (pure).

Registries with the referrers API answer ``GET /v2/<name>/referrers/<digest>`` with an image
index listing them. Registries without it (a 404 there) hold the same index under the tag
``<alg>-<hex>`` of the subject digest, which pushers update themselves (the "referrers tag
schema"). Both lists are the same document, read by ``parse_referrers``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from registry.errors import ManifestError
from registry.manifest import MAX_MANIFEST_BYTES, OCI_INDEX
from registry.reference import validate_digest


@dataclass(frozen=True, slots=True)
class Referrer:
    """One manifest whose ``subject`` is the digest asked about, as the list describes it."""

    media_type: str
    digest: str
    size: int
    artifact_type: str | None
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReferrerList:
    referrers: tuple[Referrer, ...]
    source: str  # "api" or "tag": how the registry answered

    def of_type(self, artifact_type: str) -> tuple[Referrer, ...]:
        return tuple(r for r in self.referrers if r.artifact_type == artifact_type)


def fallback_tag(digest: str) -> str:
    """The referrers tag of ``digest``: ``sha256:<hex>`` becomes ``sha256-<hex>``."""
    algorithm, _, hex_part = validate_digest(digest).partition(":")
    return f"{algorithm}-{hex_part}"[:128]  # a tag has at most 128 characters


def parse_referrers(body: bytes, source: str) -> ReferrerList:
    """The referrers an index body lists; ManifestError if it is not an image index."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"referrers list of {len(body)} bytes is too large")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ManifestError("referrers list is not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ManifestError("referrers list is not an image index")
    media_type = doc.get("mediaType", OCI_INDEX)
    if media_type != OCI_INDEX:
        raise ManifestError(f"referrers list has media type {media_type!r}")
    manifests = doc.get("manifests", [])
    if not isinstance(manifests, list):
        raise ManifestError("referrers list has no manifests list")
    return ReferrerList(
        tuple(_referrer(raw, i) for i, raw in enumerate(manifests)), source
    )


def _referrer(raw: Any, number: int) -> Referrer:
    where = f"referrers[{number}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    artifact_type = raw.get("artifactType")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise ManifestError(f"{where} needs mediaType and digest strings")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where} has an unusable size")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestError(f"{where} artifactType is not a string")
    try:
        validate_digest(digest)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    annotations = raw.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ManifestError(f"{where} annotations are not a string map")
    return Referrer(media_type, digest, size, artifact_type, annotations)
