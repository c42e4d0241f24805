"""Why a layer was not served lazily, as one of a few fixed reasons.

The reason is a metric label (``lazysnap_remote_fallback_total{reason}``) and the ``reason``
field of the ``remote_fallback`` log event, so the set is small and fixed; the message says the
rest.
"""

from __future__ import annotations

from typing import Final

from snapshotter.store.remote import RemoteLayerError

NOT_LAZY_FORMAT: Final = "not_lazy_format"  # no TOC annotation: plain gzip, zstd, tar, ...
LABELS_INVALID: Final = "labels_invalid"  # the labels name no usable reference or digest
MANIFEST_UNAVAILABLE: Final = "manifest_unavailable"  # the manifest the labels point to
REGISTRY_ERROR: Final = "registry_error"  # the registry refused or failed the blob or its TOC
REGISTRY_TIMEOUT: Final = "registry_timeout"  # no answer within the attach timeout
INDEX_INVALID: Final = "index_invalid"  # the TOC or footer is malformed or fails its digest
INTERNAL_ERROR: Final = "internal_error"  # a failure lazysnap did not expect (a bug)

REASONS: Final = (NOT_LAZY_FORMAT, LABELS_INVALID, MANIFEST_UNAVAILABLE, REGISTRY_ERROR,
                  REGISTRY_TIMEOUT, INDEX_INVALID, INTERNAL_ERROR)


class LazyFallback(RemoteLayerError):
    """``RemoteLayerError`` with its reason from ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
