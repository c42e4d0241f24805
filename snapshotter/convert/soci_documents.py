"""The documents ``lazysnap index`` writes around a SOCI index (pure).

Which layers get a zTOC; for v2 the image manifest with the index's digest annotation and the
image index holding both; for v1 the referrers tag's image index. Each function takes the
registry's bytes and returns the exact bytes to push. Documents are edited as JSON objects so
that every field lazysnap does not own, platform entries and layer descriptors included, stays
as it was. The SOCI index itself is ``snapshotter.soci_index``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from registry import Descriptor, Platform
from snapshotter import soci_index as si

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
GZIP_LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)


class IndexDocumentError(ValueError):
    """A document from the registry cannot carry a SOCI index as it stands."""


@dataclass(frozen=True, slots=True)
class LayerPlan:
    layer: Descriptor
    skip_reason: str | None  # None: build a zTOC for it

    @property
    def indexed(self) -> bool:
        return self.skip_reason is None


def plan_layers(layers: Sequence[Descriptor], min_layer_size: int) -> list[LayerPlan]:
    """A zTOC for every gzip layer of at least ``min_layer_size`` bytes, as soci decides.

    A small layer costs little to pull whole, and its zTOC would be a sizeable share of it.
    The zTOC writer reads gzip only: other layers are pulled whole as before.
    """
    plans = []
    for layer in layers:
        if layer.media_type not in GZIP_LAYER_TYPES:
            reason: str | None = f"not a tar+gzip layer ({layer.media_type})"
        elif layer.size < min_layer_size:
            reason = f"{layer.size} bytes, under the minimum of {min_layer_size}"
        else:
            reason = None
        plans.append(LayerPlan(layer, reason))
    return plans


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise IndexDocumentError(f"{what} is not JSON") from exc
    if not isinstance(doc, dict):
        raise IndexDocumentError(f"{what} is not a JSON object")
    return doc


def soci_enabled_manifest(manifest: bytes, index_digest: str) -> bytes:
    """The image manifest naming its v2 SOCI index, otherwise as it was, typed OCI."""
    doc = _oci_typed(manifest)
    annotations = doc.get("annotations")
    annotations = {} if annotations is None else annotations
    if not isinstance(annotations, dict):
        raise IndexDocumentError("image manifest annotations are not an object")
    doc["annotations"] = {**annotations, si.IMAGE_INDEX_DIGEST: index_digest}
    return _dumps(doc)


def oci_typed_manifest(manifest: bytes) -> bytes:
    """An image manifest typed OCI, for another platform of a SOCI-enabled image index."""
    return _dumps(_oci_typed(manifest))


def _oci_typed(manifest: bytes) -> dict[str, Any]:
    """Like soci, the manifests of a SOCI-enabled image are typed OCI and so are their config
    descriptors: some registries refuse an index mixing OCI and Docker manifests, and a Docker
    manifest may not carry annotations. The config blob and every layer descriptor are
    unchanged."""
    doc = _object(manifest, "image manifest")
    config = doc.get("config")
    if not isinstance(config, dict):
        raise IndexDocumentError("image manifest has no config descriptor")
    doc["mediaType"] = si.OCI_MANIFEST
    config["mediaType"] = OCI_CONFIG
    return doc


def config_platform(config: bytes) -> Platform:
    """The platform an image config names: a bare manifest has no index entry to tell it."""
    doc = _object(config, "image config")
    os_name, arch, variant = doc.get("os"), doc.get("architecture"), doc.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        raise IndexDocumentError("image config names no os and architecture")
    return Platform(os_name, arch, variant if isinstance(variant, str) and variant else None)


def platform_json(platform: Platform) -> dict[str, str]:
    doc = {"architecture": platform.architecture, "os": platform.os}
    if platform.os_version:
        doc["os.version"] = platform.os_version
    if platform.variant:
        doc["variant"] = platform.variant
    return doc


def soci_enabled_index(
    top: bytes | None,
    old_manifest_digest: str,
    new_manifest: bytes,
    new_manifest_digest: str,
    soci_index: bytes,
    soci_index_digest: str,
    platform: Platform,
    retyped: Mapping[str, tuple[str, int]] | None = None,
) -> bytes:
    """The image index a v2 SOCI-enabled image is tagged with.

    ``top`` is the image's index, or None when the tag named a bare manifest: then a new index
    lists it. The indexed manifest's entry points at the new manifest and carries its
    annotations; the SOCI index is listed after it, with the same platform, replacing a v2
    index listed earlier for that manifest. Listing the image first keeps platform pickers
    that take the first match on the image. ``retyped`` maps other platforms' Docker
    manifests to their OCI-typed copies (``oci_typed_manifest``): digest and size.
    """
    new_annotations = _object(new_manifest, "image manifest").get("annotations", {})
    if top is None:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": si.OCI_INDEX, "manifests": []}
        entries: Any = [{"mediaType": si.OCI_MANIFEST, "digest": old_manifest_digest,
                               "size": 0, "platform": platform_json(platform)}]  # fmt: skip
    else:
        doc = _object(top, "image index")
        entries = doc.get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise IndexDocumentError("image index manifests is not a list of objects")
    doc["mediaType"] = si.OCI_INDEX
    kept: list[dict[str, Any]] = []
    image_platform: Any = platform_json(platform)
    found = False
    for entry in entries:
        if _is_soci_v2_for(entry, (old_manifest_digest, new_manifest_digest)):
            continue
        if entry.get("digest") in (old_manifest_digest, new_manifest_digest):
            found = True
            image_platform = entry.get("platform", image_platform)
            kept.append({**entry, "mediaType": si.OCI_MANIFEST, "digest": new_manifest_digest,
                         "size": len(new_manifest), "annotations": new_annotations})  # fmt: skip
        elif retyped and entry.get("digest") in retyped:
            digest, size = retyped[entry["digest"]]
            kept.append({**entry, "mediaType": si.OCI_MANIFEST, "digest": digest, "size": size})
        else:
            kept.append(entry)
    if not found:
        raise IndexDocumentError(f"image index does not list manifest {old_manifest_digest}")
    kept.append(
        {
            "mediaType": si.OCI_MANIFEST,
            "digest": soci_index_digest,
            "size": len(soci_index),
            "annotations": {si.IMAGE_MANIFEST_DIGEST: new_manifest_digest},
            "platform": image_platform,
            "artifactType": si.SOCI_INDEX_V2,
        }
    )
    doc["manifests"] = kept
    return _dumps(doc)


def _is_soci_v2_for(entry: Mapping[str, Any], manifests: Sequence[str]) -> bool:
    annotations = entry.get("annotations")
    names = annotations.get(si.IMAGE_MANIFEST_DIGEST) if isinstance(annotations, dict) else None
    return entry.get("artifactType") == si.SOCI_INDEX_V2 and names in manifests


def referrers_tag_index(existing: bytes | None, soci_index: bytes, index_digest: str) -> bytes:
    """The image index under the referrers tag (``sha256-<hex>`` of the subject), for
    registries without the referrers API: what it listed plus the v1 index, once.

    Each entry carries the referrer's artifact type and annotations, as the referrers API
    would list it, so that a reader picks SOCI indexes without fetching every referrer.
    """
    if existing is None:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": si.OCI_INDEX, "manifests": []}
    else:
        doc = _object(existing, "referrers tag index")
    entries = doc.get("manifests")
    entries = [] if entries is None else entries
    if not isinstance(entries, list):
        raise IndexDocumentError("referrers tag index manifests is not a list")
    parsed = si.parse(soci_index)
    entry: dict[str, Any] = {
        "mediaType": si.OCI_MANIFEST,
        "digest": index_digest,
        "size": len(soci_index),
    }
    annotations = dict(parsed.extra_annotations)
    if parsed.build_tool is not None:
        annotations[si.BUILD_TOOL] = parsed.build_tool
    if annotations:
        entry["annotations"] = dict(sorted(annotations.items()))
    entry["artifactType"] = parsed.artifact_type
    # Entries that are not descriptors cannot be anyone's referrer: they go.
    kept = [e for e in entries if isinstance(e, dict) and e.get("digest") != index_digest]
    doc["manifests"] = [*kept, entry]
    doc["mediaType"] = si.OCI_INDEX
    return _dumps(doc)
