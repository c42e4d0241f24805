"""Layer Prepares known in advance: start reading their TOCs before containerd sends them.

Runs on a gRPC thread. Whatever the number of layers, it asks the store once which ones exist
and crosses into trio once to start the reads. ``Daemon/Resolve`` crosses once more to resolve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from snapshotter.client.documents import ImageDocuments
from snapshotter.client.unpacker import UnpackError, plan_unpack
from snapshotter.daemon_api import ResolveAnswer
from snapshotter.errors import FailedPreconditionError, InvalidArgumentError
from snapshotter.labels import SNAPSHOT_REF, validate_labels
from snapshotter.remote.resolve import answer_from_documents

log = logging.getLogger(__name__)

MAX_ANNOUNCED_LAYERS = 256  # containerd's own limit on an image's layers is 128

Existing = Callable[[Iterable[str]], set[str]]
AnnouncedLayer = tuple[Mapping[str, str], int | None]


class AheadBridge(Protocol):
    def resolve(self, image: str, platform: str) -> ImageDocuments: ...

    def read_ahead(self, layers: Sequence[AnnouncedLayer]) -> list[bool]: ...


def read_ahead_announced(
    bridge: AheadBridge, existing: Existing, layers: Sequence[AnnouncedLayer]
) -> list[bool]:
    """Start the TOC reads of announced layers whose target snapshot does not exist yet; for
    each layer, whether one started. Layers come bottom first, with Prepare labels and blob
    sizes."""
    if len(layers) > MAX_ANNOUNCED_LAYERS:
        raise InvalidArgumentError(
            f"{len(layers)} layers announced; at most {MAX_ANNOUNCED_LAYERS} at a time"
        )
    checked = [(validate_labels(labels), size) for labels, size in layers]
    present = existing(labels[SNAPSHOT_REF] for labels, _ in checked if labels.get(SNAPSHOT_REF))
    wanted = [i for i, (labels, _) in enumerate(checked)
              if labels.get(SNAPSHOT_REF) and labels[SNAPSHOT_REF] not in present]
    started = [False] * len(layers)
    if wanted:
        for i, flag in zip(wanted, bridge.read_ahead([checked[i] for i in wanted]), strict=True):
            started[i] = flag
    return started


def resolve_and_read_ahead(
    bridge: AheadBridge, existing: Existing, image: str, platform: str
) -> ResolveAnswer:
    """Resolve with the daemon's registry client, plan the unpack exactly as the CLI will, and
    start the TOC reads of the lazy layers that do not exist yet. The plan has the same name,
    manifest digest and config as the CLI's, hence the same Prepare labels."""
    documents = bridge.resolve(image, platform)
    try:
        plan = plan_unpack(documents.name, documents.manifest_digest, documents.manifest,
                           documents.config)
    except (UnpackError, ValueError) as exc:
        raise FailedPreconditionError(str(exc)) from exc
    flags = read_ahead_announced(
        bridge, existing, [(layer.labels, layer.descriptor.size) for layer in plan.layers]
    )
    started = tuple(layer.descriptor.digest
                    for layer, flag in zip(plan.layers, flags, strict=True) if flag)
    log.info("resolved image=%s manifest=%s layers=%d read_ahead=%d", documents.name,
             documents.manifest_digest, len(plan.layers), len(started))
    return answer_from_documents(documents, started)
