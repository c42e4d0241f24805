"""What the client-side unpacker needs from containerd, as plain types and a Protocol (no I/O).

``snapshotter.client.containerd_client.ContainerdClient`` implements it over containerd's gRPC API;
unit tests implement it in memory. Failures are the snapshotter's domain errors, such as
``NotFoundError`` and ``AlreadyExistsError``, or ``ContainerdError`` for everything else. So
no caller needs grpc to tell "missing" from "broken".
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from registry import Descriptor
from snapshotter.errors import SnapshotterError
from snapshotter.model import Mount, SnapshotInfo


class ContainerdError(SnapshotterError):
    """containerd failed or answered something unexpected."""


class ContainerdUnavailableError(ContainerdError):
    """containerd's socket is missing or nothing answers on it."""


@dataclass(frozen=True, slots=True)
class ContentInfo:
    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """containerd's image record: a name pointing at an index or manifest in its content store."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)


class ContainerdAPI(Protocol):
    """The calls the unpacker and the pull/unpack commands make, in containerd's namespace."""

    def lease(self) -> AbstractContextManager[str]:
        """Create a lease that every call inside the block joins; delete it on the way out."""
        ...

    def content_info(self, digest: str) -> ContentInfo: ...

    def read_content(self, digest: str, *, max_size: int) -> bytes: ...

    def write_content(
        self,
        ref: str,
        chunks: Iterable[bytes],
        *,
        expected: str,
        total: int,
        labels: Mapping[str, str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Store a blob verified against ``expected``; False if the store already had it."""
        ...

    def set_content_labels(self, digest: str, labels: Mapping[str, str]) -> None: ...

    def get_image(self, name: str) -> ImageRecord: ...

    def put_image(self, image: ImageRecord) -> None:
        """Create the image record, or point an existing one at the new target."""
        ...

    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo: ...

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]: ...

    def commit_snapshot(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]
    ) -> None: ...

    def remove_snapshot(self, snapshotter: str, key: str) -> None: ...

    def apply_diff(self, layer: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Unpack a layer blob from the content store onto ``mounts``; the applied (uncompressed)
        descriptor's digest is the layer's diff ID."""
        ...


def ingest_ref(digest: str) -> str:
    """A content-store ingest name of our own: containerd locks a ref while it is written, so a
    concurrent pull of the same blob must not share it. The second commit then simply finds the
    blob present."""
    return f"lazysnap-{digest}-{secrets.token_hex(4)}"
