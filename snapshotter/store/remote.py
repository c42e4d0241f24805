"""The store's seam to lazily served layers: what it needs, stated by the store itself.

The store knows containerd's snapshot semantics and nothing of FUSE, registries or trio. A layer
Prepare whose labels name a target (``containerd.io/snapshot.ref``) is offered to a
``RemoteLayers`` implementation with the raw labels; the implementation decides from them
whether the layer can be served lazily and either mounts it or raises ``RemoteLayerError`` with
the reason, which the store logs before falling back to an ordinary snapshot.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol


class RemoteLayerError(Exception):
    """The layer is not served lazily; the message is the logged fallback reason."""


@dataclass(frozen=True, slots=True)
class AttachedLayer:
    """A layer mounted under the FUSE mount, with what the store records to restore it."""

    layer_id: str
    slot: int
    image_ref: str
    layer_digest: str
    blob_size: int
    toc_digest: str
    annotations: dict[str, str]
    format: str


class RemoteLayers(Protocol):
    """Lazily served layers, as the store uses them. Every method is called from a gRPC thread
    and returns only when done.

    ``mount`` raises ``RemoteLayerError`` for every reason a layer is not lazy, including
    failures it did not expect: the store then serves the layer the ordinary way. ``unmount``
    and ``collect_garbage`` are best effort and never raise: the store has already committed
    what they follow, and a layer left attached or a chunk left cached costs only resources.
    """

    def mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer: ...

    def unmount(self, layer_id: str) -> None: ...

    def cached_bytes(self, layer_id: str) -> int: ...

    def collect_garbage(
        self, recorded: Mapping[str, str], attaching: Collection[str]
    ) -> None: ...
