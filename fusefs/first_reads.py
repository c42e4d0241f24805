"""Which files of each layer were read first, and how far, for startup profiles.

The daemon turns these into a profile of the image (``snapshotter/daemon/profile_publish.py``).
Recording a layer starts at its first read and stops ``window`` seconds later or after
``max_files`` files, so a long-running container costs a bounded, small amount of memory and
one dictionary lookup per read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from fusefs.layer import Layer


@dataclass(slots=True)
class LayerReads:
    started: float  # trio time of the layer's first read
    # entry -> [trio time of its first read, furthest byte read during the window]
    files: dict[int, list[float]] = field(default_factory=dict)
    closed: bool = False


@dataclass(frozen=True, slots=True)
class FirstRead:
    seconds: float  # trio time of the file's first read
    path: str  # absolute path in the layer: "/usr/bin/env"
    read_bytes: int


class FirstReads:
    """Kept by the handlers; ``read`` is called for every READ while recording is on."""

    def __init__(self, window: float, max_files: int) -> None:
        self._window = window
        self._max_files = max_files
        self._layers: dict[str, LayerReads] = {}

    def read(self, layer: Layer, entry: int, offset: int, size: int) -> None:
        reads = self._layers.get(layer.layer_id)
        now = trio.current_time()
        if reads is None:
            reads = self._layers[layer.layer_id] = LayerReads(now)
        if reads.closed:
            return
        if now - reads.started > self._window:
            reads.closed = True
            return
        end = min(offset + size, layer.index.attr(entry).size)
        seen = reads.files.get(entry)
        if seen is not None:
            seen[1] = max(seen[1], end)
        elif len(reads.files) < self._max_files:
            reads.files[entry] = [now, end]
        else:
            reads.closed = True

    def of(self, layer: Layer) -> list[FirstRead]:
        """The layer's recorded files in first-read order."""
        reads = self._layers.get(layer.layer_id)
        if reads is None:
            return []
        return [
            FirstRead(when, "/" + layer.index.path(entry), int(end))
            for entry, (when, end) in sorted(reads.files.items(), key=lambda item: item[1][0])
        ]

    def forget(self, layer_id: str) -> None:
        self._layers.pop(layer_id, None)
