"""A layer answered before its index exists: its slot is taken, its tree is not there yet.

A lazy Prepare answers once the layer's TOC is fetched and matches its digest; the index is
built afterwards. Until then the layer's name at the mount root is pending: a lookup of it
waits for ``ready`` (``fusefs.handlers.LayerPending``) instead of answering ENOENT. The kernel
learns a layer's inode numbers only from that lookup (or from the root listing, which leaves a
pending layer out), so nothing else about the layer can be asked before the build ends.

A build that fails leaves the layer pending for good with ``failure`` set: its root answers
EIO, never a tree that might be wrong, until the layer is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from fusefs.stats import LayerMeters


@dataclass(slots=True)
class PendingLayer:
    layer_id: str
    slot: int
    digest: str
    ready: trio.Event = field(default_factory=trio.Event)  # set once built, failed or removed
    failure: str | None = None  # why the index could not be built
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the build's
    meters: LayerMeters = field(default_factory=LayerMeters)  # the attached layer's, later
