"""Label rules shared with containerd (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from snapshotter.errors import InvalidArgumentError

# containerd's pkg/labels: key and value together may not exceed 4096 bytes.
MAX_LABEL_BYTES = 4096

SNAPSHOT_REF = "containerd.io/snapshot.ref"
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
STARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Return the labels as a plain dict, or raise InvalidArgumentError naming the bad key."""
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not key:
            raise InvalidArgumentError("label key must not be empty")
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            shown = key if len(key) <= 64 else key[:61] + "..."
            raise InvalidArgumentError(
                f"label key and value too long: {shown!r} is {size} bytes, "
                f"the limit is {MAX_LABEL_BYTES}"
            )
        checked[key] = value
    return checked

# Client-side unpacker (lazysnap pull / unpack): labels containerd itself reads.
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"  # only these (and SNAPSHOT_REF) reach a backend
UNCOMPRESSED = "containerd.io/uncompressed"  # on a layer blob: its diff ID
GC_REF_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."  # + snapshotter, on the config blob
GC_REF_CONTENT_CONFIG = "containerd.io/gc.ref.content.config"  # on a manifest
GC_REF_CONTENT_LAYER_PREFIX = "containerd.io/gc.ref.content.l."  # + index, on a manifest
GC_REF_CONTENT_MANIFEST_PREFIX = "containerd.io/gc.ref.content.m."  # + index, on an index
GC_EXPIRE = "containerd.io/gc.expire"  # on a lease: RFC 3339 time after which GC drops it

# Kata guest image pulling (docs/kata.md). Set by lazysnap itself, in guest-pull mode, on a layer
# it serves lazily: the chain above it may be handed to Kata's guest with that layer's
# cri.image-ref (set by containerd's CRI) as the image to pull.
KATA_GUEST_PULL = "containerd.io/snapshot/lazysnap.kata-guest-pull"
KATA_GUEST_PULL_VALUE = "true"
