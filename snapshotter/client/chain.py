"""Layer chain IDs and the per-layer labels containerd's CRI unpacker sends (pure).

chainID(1) = diffID(1); chainID(n) = sha256(chainID(n-1) + " " + diffID(n)) - the OCI image
spec's definition, which names a stack of layers independently of how it was compressed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from snapshotter import labels as L


class ImageConfigError(ValueError):
    """An image config blob whose rootfs cannot be read."""


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of every prefix of ``diff_ids``, bottom layer first."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def diff_ids_from_config(config: bytes) -> tuple[str, ...]:
    """``rootfs.diff_ids`` of an OCI / Docker image config."""
    try:
        doc = json.loads(config)
    except ValueError as exc:
        raise ImageConfigError("image config is not valid JSON") from exc
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ImageConfigError("image config has no rootfs.diff_ids list of strings")
    if isinstance(rootfs, dict) and rootfs.get("type", "layers") != "layers":
        raise ImageConfigError(f"unsupported rootfs type {rootfs.get('type')!r}")
    return tuple(diff_ids)


def image_layers_value(digests: Sequence[str], key: str = L.CRI_IMAGE_LAYERS) -> str:
    """Comma-joined ``digests``, cut so that key and value fit containerd's 4096-byte label limit.

    Like containerd, whole digests are dropped from the end: a lazy snapshotter may prefetch the
    listed layers, and skipping some is allowed.
    """
    value = ""
    for digest in digests:
        candidate = f"{value},{digest}" if value else digest
        if len(key.encode()) + len(candidate.encode()) > L.MAX_LABEL_BYTES:
            break
        value = candidate
    return value


def layer_labels(
    *,
    image_ref: str,
    manifest_digest: str,
    layer_digests: Sequence[str],
    index: int,
    chain_id: str,
    annotations: Mapping[str, str] | None = None,
    media_type: str | None = None,
) -> dict[str, str]:
    """The labels of layer ``index``'s extraction Prepare and Commit, as CRI sends them, plus
    what a lazy reader needs that CRI drops.

    Annotations under ``containerd.io/snapshot/``, such as the eStargz TOC digest, pass as they
    are, as containerd passes them. containerd would drop the other seekable-format annotations,
    the zstd:chunked positions and checksums. They and the layer's media type are forwarded under
    lazysnap's own ``containerd.io/snapshot/lazysnap.*`` names, so the daemon can decide and
    read the TOC without fetching the manifest. The reference label names the chain ID.
    """
    labels: dict[str, str] = {}
    for key, value in (annotations or {}).items():
        if key.startswith(L.SNAPSHOT_LABEL_PREFIX):
            labels[key] = value
        elif key.startswith(L.FORWARDED_ANNOTATION_PREFIXES):
            labels[L.ANNOTATION_LABEL_PREFIX + key] = value
    if media_type:
        labels[L.MEDIA_TYPE_LABEL] = media_type
    labels[L.CRI_IMAGE_REF] = image_ref
    labels[L.CRI_LAYER_DIGEST] = layer_digests[index]
    labels[L.CRI_MANIFEST_DIGEST] = manifest_digest
    labels[L.CRI_IMAGE_LAYERS] = image_layers_value(layer_digests[index:])
    labels[L.SNAPSHOT_REF] = chain_id
    return labels


def manifest_gc_labels(config_digest: str, layer_digests: Sequence[str]) -> dict[str, str]:
    """Labels on a manifest blob that make containerd's GC keep its config and layers."""
    labels = {L.GC_REF_CONTENT_CONFIG: config_digest}
    for number, digest in enumerate(layer_digests):
        labels[f"{L.GC_REF_CONTENT_LAYER_PREFIX}{number}"] = digest
    return labels


def index_gc_labels(manifest_digests: Sequence[str]) -> dict[str, str]:
    """Labels on an index blob that make containerd's GC keep its manifests."""
    return {
        f"{L.GC_REF_CONTENT_MANIFEST_PREFIX}{number}": digest
        for number, digest in enumerate(manifest_digests)
    }
