"""Whether an image has a SOCI index: then the daemon may serve its plain gzip layers lazily,
and the parallel pull must not download them ahead."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from registry import Reference, RegistryError
from snapshotter.client.documents import ImageDocuments
from snapshotter.client.progress import LayerResult
from snapshotter.lazy_formats import classify_layer, layer_compression
from snapshotter.soci_index import IMAGE_INDEX_DIGEST, SOCI_INDEX_V1

if TYPE_CHECKING:
    from registry import RegistryClient

log = logging.getLogger(__name__)


def has_v2_index(image: ImageDocuments) -> bool:
    """A SOCI v2 index is named by the image manifest's annotation: known without a request."""
    return IMAGE_INDEX_DIGEST in image.manifest.annotations


async def has_soci_index(registry: RegistryClient, ref: Reference, image: ImageDocuments) -> bool:
    """v2 from the manifest; v1 from the manifest's referrers (one request, two on a registry
    without the referrers API). A failed lookup counts as no index: layers are then downloaded
    ahead as for any gzip image, which costs bytes, never correctness."""
    if has_v2_index(image):
        return True
    try:
        found = await registry.fetch_referrers(ref, image.manifest_digest, SOCI_INDEX_V1)
    except RegistryError as exc:
        log.info("pull soci-lookup-failed manifest=%s error=%s", image.manifest_digest,
                 type(exc).__name__)
        return False
    return bool(found.of_type(SOCI_INDEX_V1))


def pulled_gzip_in_full(image: ImageDocuments, results: Sequence[LayerResult]) -> bool:
    """Whether this pull fetched and unpacked a plain gzip layer of an image without a v2
    index: then a SOCI index would have let it pull lazily, and the daemon may publish one
    (``[index] publish``; the daemon itself checks for a v1 index)."""
    if has_v2_index(image):
        return False
    applied = {result.digest for result in results if result.outcome == "applied"}
    return any(
        layer.digest in applied
        and layer_compression(layer.media_type) == "gzip"
        and not classify_layer(layer.media_type, layer.annotations).lazy
        for layer in image.manifest.layers
    )
