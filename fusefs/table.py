"""The attached layers, by slot for inode numbers and by name for lookups at the mount root."""

from __future__ import annotations

import os

from fusefs.inodes import MAX_SLOT
from fusefs.layer import Layer
from fusefs.pending import PendingLayer
from fusefs.slot_mark import SlotMark

_MAX_NAME = 255


def check_layer_id(layer_id: str) -> bytes:
    """The layer id as a directory name; ValueError unless it is one safe path component."""
    name = os.fsencode(layer_id)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise ValueError(f"layer id must be a single path component: {layer_id!r}")
    if len(name) > _MAX_NAME:
        raise ValueError(f"layer id longer than {_MAX_NAME} bytes: {layer_id!r}")
    return name


class LayerTable:
    def __init__(self, mark: SlotMark | None = None) -> None:
        """``mark``: where slots handed out are recorded, for a table that may serve a FUSE
        connection taken over from another process."""
        self._by_slot: dict[int, Layer] = {}
        self._by_name: dict[bytes, int] = {}
        # Layers whose slot is taken but whose index is still being built, or failed to build.
        self._pending: dict[bytes, PendingLayer] = {}
        self._mark = mark
        # One past the highest slot used so far, by this process or one before it.
        self._next = mark.first_unreserved if mark is not None else 1
        # How many times a layer was added or removed: the mount root's listing changed.
        self.changes = 0

    def __len__(self) -> int:
        return len(self._by_slot)

    def get(self, slot: int) -> Layer | None:
        return self._by_slot.get(slot)

    def slot_of(self, name: bytes) -> int | None:
        return self._by_name.get(name)

    def pending(self, name: bytes) -> PendingLayer | None:
        return self._pending.get(name)

    def pending_layers(self) -> list[PendingLayer]:
        return sorted(self._pending.values(), key=lambda p: p.slot)

    def add_pending(self, pending: PendingLayer) -> None:
        """Take ``pending.slot`` and its name until ``finish_pending`` or ``remove_pending``."""
        name = self._check_free(pending.layer_id, pending.slot)
        self._pending[name] = pending
        self._next = max(self._next, pending.slot + 1)

    def remove_pending(self, layer_id: str) -> PendingLayer | None:
        return self._pending.pop(os.fsencode(layer_id), None)

    def by_id(self, layer_id: str) -> Layer | None:
        slot = self._by_name.get(os.fsencode(layer_id))
        return None if slot is None else self._by_slot[slot]

    def layers(self) -> list[Layer]:
        """Attached layers in slot order, which is the mount root's stable readdir order."""
        return [self._by_slot[slot] for slot in sorted(self._by_slot)]

    def free_slot(self) -> int:
        """A slot never handed out before on this connection, while any are left. It is recorded
        in the mark before it is returned.

        The kernel may keep inodes of a detached layer cached for a long time; a new layer at
        the same slot would reuse their numbers for different files. Only the same layer may
        come back to its slot: the daemon pins the slots it stored when it restores layers.
        """
        slot = self._next
        if slot > MAX_SLOT:  # a few billion attaches later: fall back to the lowest free one
            slot = 1
            taken = set(self._by_slot) | {p.slot for p in self._pending.values()}
            while slot in taken:
                slot += 1
            if slot > MAX_SLOT:
                raise RuntimeError("no free layer slot")
        if self._mark is not None:
            self._mark.reserve(slot)
        return slot

    def add(self, layer: Layer) -> None:
        """Attach ``layer``; a pending layer of the same name and slot becomes it."""
        name = check_layer_id(layer.layer_id)
        pending = self._pending.get(name)
        if pending is not None and pending.slot == layer.slot:
            del self._pending[name]
        name = self._check_free(layer.layer_id, layer.slot)
        self._by_slot[layer.slot] = layer
        self._by_name[name] = layer.slot
        self._next = max(self._next, layer.slot + 1)
        self.changes += 1

    def _check_free(self, layer_id: str, slot: int) -> bytes:
        name = check_layer_id(layer_id)
        if name in self._by_name or name in self._pending:
            raise ValueError(f"layer already attached: {layer_id!r}")
        if slot in self._by_slot or any(p.slot == slot for p in self._pending.values()):
            raise ValueError(f"layer slot already in use: {slot}")
        if not 1 <= slot <= MAX_SLOT:
            raise ValueError(f"layer slot out of range: {slot}")
        return name

    def remove(self, layer_id: str) -> Layer:
        name = os.fsencode(layer_id)
        slot = self._by_name.pop(name, None)
        if slot is None:
            raise KeyError(layer_id)
        self.changes += 1
        return self._by_slot.pop(slot)
