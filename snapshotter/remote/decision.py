"""Decide from a Prepare's labels whether a layer can be served lazily. Pure, no network.

containerd passes a layer's descriptor annotations down only when their keys start with
``containerd.io/snapshot/``, so the eStargz TOC digest arrives as is. lazysnap's own unpacker
also forwards the other annotations a reader needs, the zstd:chunked positions and checksums,
and the layer's media type. They go under ``containerd.io/snapshot/lazysnap.annotation/<key>``
and ``containerd.io/snapshot/lazysnap.media-type``.

Which image and layer a Prepare is for comes from one of two label sets: the CRI one, set by
containerd's CRI plugin, lazysnap pull and ``ctr-remote --use-containerd-labels``, or
stargz-snapshotter's, set by ``ctr-remote image rpull`` and nerdctl's stargz mode. CRI wins when
both are whole; the two are never mixed. A layer whose descriptor lists ``urls`` is a foreign
layer kept outside the registry: it is left to containerd, whose fetcher knows those URLs, as
lazysnap reads blobs from the registry and its hosts.toml mirrors only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from registry import InvalidReferenceError, parse_reference
from snapshotter.labels import (
    ANNOTATION_LABEL_PREFIX,
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    ESTARGZ_TOC_DIGEST,
    MEDIA_TYPE_LABEL,
    SNAPSHOT_REF,
    STARGZ_DIGEST,
    STARGZ_LAYERS,
    STARGZ_REFERENCE,
    STARGZ_URLS,
    STARGZ_URLS_PREFIX,
)
from snapshotter.lazy_formats import LazyFormat, classify_layer, plain_gzip

# Assumed when no media type is passed: the TOC annotations decide between the formats.
_DEFAULT_MEDIA_TYPES: dict[LazyFormat, str] = {
    "estargz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd:chunked": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True, slots=True)
class RemoteLayerRequest:
    """A layer extraction containerd announced with enough labels to try a lazy mount."""

    chain_ref: str  # containerd.io/snapshot.ref: the chain ID the committed snapshot stands for
    image_ref: str
    layer_digest: str
    manifest_digest: str | None
    image_layers: tuple[str, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    media_type: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteDecision:
    """``format`` set: serve lazily. ``needs_manifest``: only the manifest can tell."""

    request: RemoteLayerRequest | None
    format: LazyFormat | None
    reason: str
    needs_manifest: bool = False
    # A plain gzip layer of a known manifest: lazy if the image's SOCI index lists a zTOC for it.
    soci: bool = False


def layer_annotations(labels: Mapping[str, str]) -> dict[str, str]:
    annotations = {
        key[len(ANNOTATION_LABEL_PREFIX):]: value
        for key, value in labels.items()
        if key.startswith(ANNOTATION_LABEL_PREFIX) and len(key) > len(ANNOTATION_LABEL_PREFIX)
    }
    if ESTARGZ_TOC_DIGEST in labels:
        annotations[ESTARGZ_TOC_DIGEST] = labels[ESTARGZ_TOC_DIGEST]
    return annotations


def classify(media_type: str | None, annotations: Mapping[str, str]) -> tuple[LazyFormat | None,
                                                                              str]:
    if media_type:
        found = classify_layer(media_type, annotations)
        return found.format, found.reason
    for fmt, assumed in _DEFAULT_MEDIA_TYPES.items():
        found = classify_layer(assumed, annotations)
        if found.format == fmt:
            return found.format, found.reason
    return None, "no eStargz or zstd:chunked TOC annotation among the labels"


@dataclass(frozen=True, slots=True)
class LayerSource:
    """Which image and layer a Prepare is for, as one client's label set tells it."""

    image_ref: str
    layer_digest: str
    image_layers: tuple[str, ...]
    manifest_digest: str | None


def _split_digests(value: str) -> tuple[str, ...]:
    return tuple(d for d in value.split(",") if d)


def layer_source(labels: Mapping[str, str]) -> LayerSource | None:
    """The CRI labels when both are there, else stargz-snapshotter's, else None."""
    image_ref = labels.get(CRI_IMAGE_REF, "")
    layer_digest = labels.get(CRI_LAYER_DIGEST, "")
    if image_ref and layer_digest:
        return LayerSource(image_ref, layer_digest,
                           _split_digests(labels.get(CRI_IMAGE_LAYERS, "")),
                           labels.get(CRI_MANIFEST_DIGEST) or None)
    image_ref = labels.get(STARGZ_REFERENCE, "")
    layer_digest = labels.get(STARGZ_DIGEST, "")
    if image_ref and layer_digest:
        # stargz's set names no manifest: a layer its labels cannot classify stays unlazy.
        return LayerSource(image_ref, layer_digest,
                           _split_digests(labels.get(STARGZ_LAYERS, "")), None)
    return None


def _listed_with_urls(labels: Mapping[str, str], layers: tuple[str, ...], digest: str) -> bool:
    """Whether the urls label at the digest's place in the layer list names any URL."""
    return any(labels.get(STARGZ_URLS_PREFIX + str(i), "").strip(",")
               for i, listed in enumerate(layers) if listed == digest)


def decide(labels: Mapping[str, str]) -> RemoteDecision | None:
    """None when the Prepare is not a layer extraction: it has no snapshot.ref label."""
    chain_ref = labels.get(SNAPSHOT_REF)
    if not chain_ref:
        return None
    source = layer_source(labels)
    if source is None:
        return RemoteDecision(
            None, None, "no cri.image-ref / cri.layer-digest labels nor stargz.reference / "
            "stargz.digest labels (snapshot annotations off?)"
        )
    try:
        parse_reference(source.image_ref)
    except InvalidReferenceError:
        # The value is not echoed: a mistyped reference may hold what the user meant as a login.
        return RemoteDecision(None, None, "the image reference label is not a valid reference")
    layer_digest = source.layer_digest
    if not layer_digest.startswith("sha256:"):
        return RemoteDecision(None, None, f"unsupported layer digest {layer_digest[:80]!r}")
    if labels.get(STARGZ_URLS, "").strip(",") or _listed_with_urls(
            labels, source.image_layers, layer_digest):
        return RemoteDecision(
            None, None, "the layer descriptor lists urls outside the registry (foreign layer)"
        )
    # Neighbours are only read ahead, from the registry: one kept elsewhere is skipped.
    layers = tuple(d for d in source.image_layers
                   if d == layer_digest or not _listed_with_urls(labels, source.image_layers, d))
    media_type = labels.get(MEDIA_TYPE_LABEL) or None
    request = RemoteLayerRequest(
        chain_ref=chain_ref,
        image_ref=source.image_ref,
        layer_digest=layer_digest,
        manifest_digest=source.manifest_digest,
        image_layers=layers,
        annotations=layer_annotations(labels),
        media_type=media_type,
    )
    fmt, reason = classify(media_type, request.annotations)
    if fmt is not None:
        return RemoteDecision(request, fmt, reason)
    if request.manifest_digest and media_type and plain_gzip(media_type, request.annotations):
        return RemoteDecision(request, None, "plain gzip layer: its image's SOCI index may list "
                              "a zTOC for it", soci=True)
    if request.manifest_digest and not request.annotations and media_type is None:
        # CRI forwards no zstd:chunked annotations: the manifest may still show a seekable layer.
        return RemoteDecision(request, None, "labels do not tell; manifest needed",
                              needs_manifest=True)
    return RemoteDecision(request, None, reason)
