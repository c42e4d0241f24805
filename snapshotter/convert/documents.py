"""The documents ``lazysnap convert`` writes: layer descriptors, the config and the manifest (pure).

No I/O here: the converter hands in what it downloaded and converted, and gets back the exact
bytes to push. Everything written uses OCI media types, whatever the source used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from registry import Platform
from snapshotter.labels import (
    ESTARGZ_TOC_DIGEST,
    ESTARGZ_UNCOMPRESSED_SIZE,
    LEGACY_ZSTD_CHUNKED_CHECKSUM,
    LEGACY_ZSTD_CHUNKED_POSITION,
    ZSTD_CHUNKED_CHECKSUM,
    ZSTD_CHUNKED_POSITION,
    ZSTD_CHUNKED_TARSPLIT_POSITION,
)

TargetFormat = Literal["estargz", "zstd:chunked"]
TARGET_FORMATS: tuple[TargetFormat, ...] = ("estargz", "zstd:chunked")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_MANIFEST_TYPES = frozenset(
    {OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"}
)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

TARGET_MEDIA_TYPES: Mapping[TargetFormat, str] = {
    "estargz": OCI_LAYER_GZIP,
    "zstd:chunked": OCI_LAYER_ZSTD,
}

# Source layer media types the converter reads, mapped to their OCI equivalent. The writers
# accept tar, tar+gzip and tar+zstd. Non-distributable / foreign layers are left out on purpose:
# their blobs often live outside the registry and must not be re-pushed.
CONVERTIBLE_MEDIA_TYPES: Mapping[str, str] = {
    OCI_LAYER_GZIP: OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD: OCI_LAYER_ZSTD,
    OCI_LAYER_TAR: OCI_LAYER_TAR,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER_TAR,
}

# Annotations that describe one blob's seekable layout. A converted blob has a new layout, so
# stale ones from the source must go, say zstd:chunked keys on a layer now written as eStargz.
FORMAT_ANNOTATIONS = frozenset(
    {
        ESTARGZ_TOC_DIGEST,
        ESTARGZ_UNCOMPRESSED_SIZE,
        ZSTD_CHUNKED_CHECKSUM,
        ZSTD_CHUNKED_POSITION,
        ZSTD_CHUNKED_TARSPLIT_POSITION,
        LEGACY_ZSTD_CHUNKED_CHECKSUM,
        LEGACY_ZSTD_CHUNKED_POSITION,
    }
)


class ConvertError(Exception):
    """The image cannot be converted: an unsupported layer, a malformed config, a bad target."""


def parse_target_format(text: str) -> TargetFormat:
    for fmt in TARGET_FORMATS:
        if text == fmt:
            return fmt
    raise ConvertError(f"unknown format {text!r} (choose {' or '.join(TARGET_FORMATS)})")


def base_media_type(media_type: str) -> str:
    return media_type.split(";", 1)[0].strip().lower()


def check_convertible(media_type: str, digest: str) -> str:
    """The layer's OCI media type, or ``ConvertError`` for a layer the writers cannot read."""
    oci = CONVERTIBLE_MEDIA_TYPES.get(base_media_type(media_type))
    if oci is None:
        raise ConvertError(f"layer {digest}: unsupported layer media type {media_type!r}")
    return oci


@dataclass(frozen=True, slots=True)
class LayerOut:
    """One layer of the new image: its descriptor fields and its DiffID for the config."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(sorted(self.annotations.items()))
        return doc


def converted_annotations(
    source: Mapping[str, str], written: Mapping[str, str]
) -> dict[str, str]:
    """The source layer's annotations minus stale format keys, plus the writer's."""
    kept = {k: v for k, v in source.items() if k not in FORMAT_ANNOTATIONS}
    kept.update(written)
    return kept


def source_diff_ids(config: bytes) -> list[str]:
    """``rootfs.diff_ids`` of an image config, validated as a list of strings."""
    doc = _config_object(config)
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ConvertError("image config has no rootfs.diff_ids list")
    return list(diff_ids)


def rewrite_config(config: bytes, diff_ids: Sequence[str]) -> bytes:
    """The config with ``rootfs.diff_ids`` replaced; every other field is kept as it was."""
    doc = _config_object(config)
    old = source_diff_ids(config)
    if len(old) != len(diff_ids):
        raise ConvertError(f"config lists {len(old)} layers, the new image has {len(diff_ids)}")
    doc["rootfs"] = {**doc["rootfs"], "diff_ids": list(diff_ids)}
    return json.dumps(doc, separators=(",", ":")).encode()


def build_manifest(
    config_digest: str,
    config_size: int,
    layers: Sequence[LayerOut],
    annotations: Mapping[str, str],
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, separators=(",", ":")).encode()


DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_runtime(config: bytes) -> tuple[list[str], str]:
    """The environment and working directory a container of this image starts with."""
    runtime = _config_object(config).get("config")
    runtime = runtime if isinstance(runtime, dict) else {}
    env = runtime.get("Env")
    env = [e for e in env if isinstance(e, str)] if isinstance(env, list) else []
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    cwd = runtime.get("WorkingDir")
    return env, cwd if isinstance(cwd, str) and cwd.startswith("/") else "/"


def _config_object(config: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(config)
    except ValueError as exc:
        raise ConvertError("image config is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ConvertError("image config is not a JSON object")
    return doc


def is_platform_image(media_type: str, platform: Platform | None) -> bool:
    """An index entry worth converting: an image manifest for a real platform. buildx puts
    attestation manifests in the index with platform ``unknown/unknown``."""
    return (
        base_media_type(media_type) in IMAGE_MANIFEST_TYPES
        and platform is not None
        and platform.os != "unknown"
    )


def platform_object(platform: Platform) -> dict[str, str]:
    doc = {"architecture": platform.architecture, "os": platform.os}
    if platform.os_version:
        doc["os.version"] = platform.os_version
    if platform.variant:
        doc["variant"] = platform.variant
    return doc


def build_index(
    manifests: Sequence[tuple[Platform | None, str, int]], annotations: Mapping[str, str]
) -> bytes:
    """An OCI index with one entry per platform, manifest digest and manifest size."""
    entries: list[dict[str, Any]] = []
    for platform, digest, size in manifests:
        entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest, "size": size}
        if platform is not None:
            entry["platform"] = platform_object(platform)
        entries.append(entry)
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, separators=(",", ":")).encode()
