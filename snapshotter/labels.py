"""Every label and annotation key the snapshotter side reads or writes, and containerd's label
rules (pure).

Each key says who sets it. fusefs cannot import this package, so the seekable-format keys it
reads are defined again in ``fusefs/formats/annotations.py``; a unit test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping

from snapshotter.errors import InvalidArgumentError

# containerd's pkg/labels: key and value together may not exceed 4096 bytes.
MAX_LABEL_BYTES = 4096

# -- labels on a Prepare, as containerd's unpacker sends them -------------------------------

# Set by containerd's unpacker on a layer extraction: the chain ID the committed snapshot stands
# for. Only keys under SNAPSHOT_LABEL_PREFIX (and this one) reach a snapshotter.
SNAPSHOT_REF = "containerd.io/snapshot.ref"
SNAPSHOT_LABEL_PREFIX = "containerd.io/snapshot/"
# Set by CRI (snapshot annotations on) and by lazysnap pull: which image and layer this is.
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"  # comma-joined, cut to fit
# Set by stargz-snapshotter's clients (ctr-remote image rpull, nerdctl --snapshotter stargz) on
# each layer Prepare, from its fs/source AppendDefaultLabelsHandlerWrapper: the image reference
# as the user typed it, the layer's digest, and the digests of this layer and those after it,
# comma-joined and cut to fit MAX_LABEL_BYTES.
STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
# Set by the same clients (and by ctr-remote --use-containerd-labels next to the CRI labels): the
# layer descriptor's own urls, comma-joined, and under the prefix plus a position in the layer
# list those of each listed layer. The value is empty when the descriptor has no urls.
STARGZ_URLS = "containerd.io/snapshot/remote/urls"
STARGZ_URLS_PREFIX = "containerd.io/snapshot/remote/urls."
# Set by this snapshotter on a snapshot it mounts lazily, as stargz does.
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"
# Set by lazysnap pull: the layer annotations containerd would drop, each under this prefix,
# and the layer's media type. The daemon reads them to decide without fetching the manifest.
ANNOTATION_LABEL_PREFIX = "containerd.io/snapshot/lazysnap.annotation/"
MEDIA_TYPE_LABEL = "containerd.io/snapshot/lazysnap.media-type"

# -- layer descriptor annotations of the seekable formats ----------------------------------

# Set by eStargz producers (stargz-snapshotter's ctr-remote, nerdctl, lazysnap convert) and by
# the stargz variant of zstd:chunked: the sha256 of the uncompressed TOC JSON. It lies under
# containerd.io/snapshot/, so containerd passes it to the snapshotter as it is.
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"  # eStargz producers
# Set by zstd:chunked producers (containers/storage, podman, lazysnap convert): the sha256 of
# the compressed TOC, and "<offset>:<compressed length>:<uncompressed length>:1".
ZSTD_CHUNKED_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
ZSTD_CHUNKED_POSITION = "io.github.containers.zstd-chunked.manifest-position"
ZSTD_CHUNKED_TARSPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
# The same facts under the names stargz-snapshotter's zstd:chunked converter writes.
LEGACY_ZSTD_CHUNKED_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_ZSTD_CHUNKED_POSITION = "io.containers.zstd-chunked.manifest-position"
# The annotations lazysnap pull forwards under ANNOTATION_LABEL_PREFIX: those a lazy reader uses.
FORWARDED_ANNOTATION_PREFIXES = (
    "io.github.containers.zstd-chunked.",
    "io.containers.zstd-chunked.",
    "io.containers.estargz.",
    # The image manifest's SOCI v2 index digest, which lazysnap pull adds to every layer's.
    "com.amazon.soci.",
)
# Recorded with a remote layer served through a SOCI zTOC: the zTOC's digest (a restart reads
# the zTOC saved for it, or fetches it by this digest).
SOCI_ZTOC_DIGEST = "lazysnap.soci.ztoc-digest"

# -- labels lazysnap pull / unpack puts on containerd's own objects ------------------------

UNCOMPRESSED = "containerd.io/uncompressed"  # on a layer blob: its diff ID
GC_REF_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."  # + snapshotter, on the config blob
GC_REF_CONTENT_CONFIG = "containerd.io/gc.ref.content.config"  # on a manifest
GC_REF_CONTENT_LAYER_PREFIX = "containerd.io/gc.ref.content.l."  # + index, on a manifest
GC_REF_CONTENT_MANIFEST_PREFIX = "containerd.io/gc.ref.content.m."  # + index, on an index
GC_EXPIRE = "containerd.io/gc.expire"  # on a lease: RFC 3339 time after which GC drops it


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

# Kata guest image pulling (docs/kata.md). Set by lazysnap itself, in guest-pull mode, on a layer
# it serves lazily: the chain above it may be handed to Kata's guest with that layer's
# cri.image-ref (set by containerd's CRI) as the image to pull.
KATA_GUEST_PULL = "containerd.io/snapshot/lazysnap.kata-guest-pull"
KATA_GUEST_PULL_VALUE = "true"
