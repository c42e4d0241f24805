"""The SOCI index manifest, as soci-snapshotter publishes it: the model, ``build`` and ``parse``.

A SOCI index is an OCI image manifest whose config is the two-byte ``{}`` blob typed with the
index's artifact type, and whose "layers" are the zTOCs, one per indexed image layer, each
annotated with the digest of the layer it indexes. Version 1 names the image manifest it
belongs to in ``subject`` and is found through the referrers API. Version 2 has no subject; the
image manifest names the index in its ``com.amazon.soci.index-digest`` annotation and both sit
in one image index. Pure: no I/O, stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Media and artifact types (soci-snapshotter soci/soci_index.go, docs/soci-index-manifest-v2.md).
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
ZTOC_MEDIA_TYPE = "application/octet-stream"
PREFETCH_MEDIA_TYPE = "application/vnd.amazon.soci.prefetch.v1+json"

# The index's config: the empty JSON object, which OCI 1.0 registries require to exist.
EMPTY_CONFIG = b"{}"
EMPTY_CONFIG_DIGEST = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()

# Annotations on each zTOC descriptor.
LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
SPAN_SIZE = "com.amazon.soci.span-size"
DISABLE_XATTRS = "com.amazon.soci.disable-xattrs"
# Annotation on the index manifest itself.
BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
# v2: on the image manifest, the digest of its SOCI index.
IMAGE_INDEX_DIGEST = "com.amazon.soci.index-digest"
# v2: on the SOCI index's descriptor in the image index, the image manifest it belongs to.
IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"

# Limits for documents from a registry. The distribution spec lets registries refuse
# manifests over 4 MiB, and no image has thousands of layers.
MAX_INDEX_BYTES = 4 * 1024 * 1024
MAX_BLOBS = 4096
# The zTOC reader refuses larger zTOCs; a descriptor claiming more is hostile.
MAX_ZTOC_BYTES = 150 * 1024 * 1024
# A size past JSON's exact integers cannot be a real blob.
MAX_BLOB_SIZE = 2**53

Version = Literal[1, 2]
ARTIFACT_TYPES: Mapping[Version, str] = {1: SOCI_INDEX_V1, 2: SOCI_INDEX_V2}

_DIGEST = re.compile(r"sha256:[a-f0-9]{64}\Z")


class SociIndexError(ValueError):
    """A SOCI index document (or a value meant for one) is malformed or hostile."""


@dataclass(frozen=True, slots=True)
class ZtocDescriptor:
    """One zTOC blob of the index and the image layer it indexes."""

    digest: str
    size: int
    layer_digest: str
    layer_media_type: str
    span_size: int | None = None
    disable_xattrs: bool = False
    # Annotations soci does not define, kept so that a parse/build round trip loses nothing.
    extra_annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Subject:
    """The image manifest a v1 index belongs to."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class SociIndex:
    version: Version
    ztocs: Mapping[str, ZtocDescriptor]  # keyed by the digest of the layer each indexes
    subject: Subject | None = None  # set for v1 and only v1
    build_tool: str | None = None
    # Blobs that are not zTOCs (soci's prefetch artifacts): kept, not interpreted.
    other_blobs: tuple[Mapping[str, Any], ...] = ()
    extra_annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version not in ARTIFACT_TYPES:
            raise SociIndexError(f"unknown SOCI index version {self.version!r}")
        if (self.version == 1) != (self.subject is not None):
            raise SociIndexError("a v1 SOCI index needs a subject and a v2 one has none")
        for layer, ztoc in self.ztocs.items():
            if layer != ztoc.layer_digest:
                raise SociIndexError(f"zTOC for {ztoc.layer_digest} is keyed by {layer}")
            _check_ztoc(ztoc)
        if self.subject is not None:
            _check_digest(self.subject.digest, "subject")
            _check_size(self.subject.size, "subject", MAX_INDEX_BYTES)
        if len(self.ztocs) + len(self.other_blobs) > MAX_BLOBS:
            raise SociIndexError(f"more than {MAX_BLOBS} blobs")

    @property
    def artifact_type(self) -> str:
        return ARTIFACT_TYPES[self.version]

    def ztoc_for(self, layer_digest: str) -> ZtocDescriptor | None:
        return self.ztocs.get(layer_digest)


def build(index: SociIndex) -> bytes:
    """The index manifest's JSON bytes, in soci's field order; push it as ``OCI_MANIFEST``."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": index.artifact_type,
            "digest": EMPTY_CONFIG_DIGEST,
            "size": len(EMPTY_CONFIG),
        },
        "layers": [_ztoc_json(z) for z in index.ztocs.values()] + list(index.other_blobs),
    }
    if index.subject is not None:
        doc["subject"] = {
            "mediaType": index.subject.media_type,
            "digest": index.subject.digest,
            "size": index.subject.size,
        }
    annotations = dict(index.extra_annotations)
    if index.build_tool is not None:
        annotations[BUILD_TOOL] = index.build_tool
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(doc, separators=(",", ":")).encode()


def parse(content: bytes) -> SociIndex:
    """A SOCI index manifest (v1 or v2) from its bytes; ``SociIndexError`` when malformed.

    The version comes from the config's media type, as soci decides it. Each zTOC must name its
    layer and no layer may have two zTOCs: which of two would be the right one is unknowable.
    """
    if len(content) > MAX_INDEX_BYTES:
        raise SociIndexError(f"SOCI index of {len(content)} bytes exceeds {MAX_INDEX_BYTES}")
    try:
        doc = json.loads(content)
    except (ValueError, RecursionError) as exc:
        raise SociIndexError(f"SOCI index is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SociIndexError("SOCI index is not a JSON object")
    if doc.get("schemaVersion") != 2:
        raise SociIndexError("SOCI index schemaVersion is not 2")
    media_type = doc.get("mediaType", OCI_MANIFEST)
    if media_type != OCI_MANIFEST:
        raise SociIndexError(f"SOCI index has media type {media_type!r}, not an OCI manifest")
    version = _version(doc.get("config"), doc.get("artifactType"))
    raw_blobs = doc.get("layers")
    if raw_blobs is None:
        raw_blobs = []
    if not isinstance(raw_blobs, list):
        raise SociIndexError("SOCI index layers is not a list")
    if len(raw_blobs) > MAX_BLOBS:
        raise SociIndexError(f"SOCI index has {len(raw_blobs)} blobs, more than {MAX_BLOBS}")
    ztocs: dict[str, ZtocDescriptor] = {}
    others: list[Mapping[str, Any]] = []
    for position, raw in enumerate(raw_blobs):
        where = f"blob {position}"
        if not isinstance(raw, dict):
            raise SociIndexError(f"{where} is not an object")
        if raw.get("mediaType") != ZTOC_MEDIA_TYPE:
            _check_descriptor(raw, where, MAX_BLOB_SIZE)
            others.append(raw)
            continue
        ztoc = _ztoc(raw, where)
        if ztoc.layer_digest in ztocs:
            raise SociIndexError(f"two zTOCs index layer {ztoc.layer_digest}")
        ztocs[ztoc.layer_digest] = ztoc
    subject = _subject(doc.get("subject"))
    if version == 1 and subject is None:
        raise SociIndexError("SOCI index v1 has no subject")
    if version == 2 and subject is not None:
        raise SociIndexError("SOCI index v2 has a subject; v2 indexes are bound by annotation")
    annotations = _str_map(doc.get("annotations"), "SOCI index annotations")
    build_tool = annotations.pop(BUILD_TOOL, None)
    return SociIndex(version, ztocs, subject, build_tool, tuple(others), annotations)


def index_digest_of(manifest_annotations: Mapping[str, str]) -> str | None:
    """The SOCI v2 index an image manifest names, if any; a malformed value is an error."""
    value = manifest_annotations.get(IMAGE_INDEX_DIGEST)
    if value is None:
        return None
    _check_digest(value, IMAGE_INDEX_DIGEST)
    return value


def _version(config: Any, artifact_type: Any) -> Version:
    if not isinstance(config, dict):
        raise SociIndexError("SOCI index has no config descriptor")
    config_type = config.get("mediaType")
    versions = {media: version for version, media in ARTIFACT_TYPES.items()}
    if config_type not in versions:
        raise SociIndexError(f"config media type {config_type!r} is not a SOCI index type")
    if artifact_type is not None and artifact_type != config_type:
        raise SociIndexError(
            f"artifactType {artifact_type!r} disagrees with config type {config_type!r}"
        )
    _check_descriptor(config, "config", MAX_INDEX_BYTES)
    return versions[config_type]


def _ztoc(raw: Mapping[str, Any], where: str) -> ZtocDescriptor:
    digest, size = _check_descriptor(raw, where, MAX_ZTOC_BYTES)
    annotations = _str_map(raw.get("annotations"), f"{where} annotations")
    layer_digest = annotations.pop(LAYER_DIGEST, None)
    if layer_digest is None:
        raise SociIndexError(f"{where}: zTOC without the {LAYER_DIGEST} annotation")
    _check_digest(layer_digest, f"{where} layer digest")
    layer_media_type = annotations.pop(LAYER_MEDIA_TYPE, "")
    span_text = annotations.pop(SPAN_SIZE, None)
    span_size = None
    if span_text is not None:
        if not span_text.isdigit() or not 0 < int(span_text) <= MAX_BLOB_SIZE:
            raise SociIndexError(f"{where}: span size {span_text!r} is not a positive integer")
        span_size = int(span_text)
    disable_xattrs = annotations.pop(DISABLE_XATTRS, "false") == "true"
    return ZtocDescriptor(
        digest, size, layer_digest, layer_media_type, span_size, disable_xattrs, annotations
    )


def _ztoc_json(ztoc: ZtocDescriptor) -> dict[str, Any]:
    annotations = dict(ztoc.extra_annotations)
    annotations[LAYER_MEDIA_TYPE] = ztoc.layer_media_type
    annotations[LAYER_DIGEST] = ztoc.layer_digest
    if ztoc.span_size is not None:
        annotations[SPAN_SIZE] = str(ztoc.span_size)
    if ztoc.disable_xattrs:
        annotations[DISABLE_XATTRS] = "true"
    return {
        "mediaType": ZTOC_MEDIA_TYPE,
        "digest": ztoc.digest,
        "size": ztoc.size,
        "annotations": dict(sorted(annotations.items())),
    }


def _subject(raw: Any) -> Subject | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SociIndexError("SOCI index subject is not an object")
    digest, size = _check_descriptor(raw, "subject", MAX_INDEX_BYTES)
    return Subject(str(raw["mediaType"]), digest, size)


def _check_descriptor(raw: Mapping[str, Any], where: str, max_size: int) -> tuple[str, int]:
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise SociIndexError(f"{where}: descriptor without a media type")
    if not isinstance(digest, str):
        raise SociIndexError(f"{where}: descriptor without a digest")
    _check_digest(digest, where)
    if not isinstance(size, int) or isinstance(size, bool):
        raise SociIndexError(f"{where}: descriptor size is not an integer")
    _check_size(size, where, max_size)
    return digest, size


def _check_ztoc(ztoc: ZtocDescriptor) -> None:
    _check_digest(ztoc.digest, "zTOC digest")
    _check_digest(ztoc.layer_digest, "zTOC layer digest")
    _check_size(ztoc.size, "zTOC", MAX_ZTOC_BYTES)
    if ztoc.span_size is not None and not 0 < ztoc.span_size <= MAX_BLOB_SIZE:
        raise SociIndexError(f"zTOC span size {ztoc.span_size} is not positive")
    for key in (LAYER_DIGEST, LAYER_MEDIA_TYPE, SPAN_SIZE, DISABLE_XATTRS):
        if key in ztoc.extra_annotations:
            raise SociIndexError(f"{key} belongs in its field, not in extra annotations")


def _check_digest(value: str, where: str) -> None:
    # Only sha256: the digests soci writes, and the only ones the zTOC reader checks.
    if not _DIGEST.match(value):
        raise SociIndexError(f"{where}: {value[:80]!r} is not a sha256 digest")


def _check_size(size: int, where: str, max_size: int) -> None:
    if not 0 <= size <= max_size:
        raise SociIndexError(f"{where}: size {size} is outside 0..{max_size}")


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SociIndexError(f"{where} must map strings to strings")
    return dict(value)
