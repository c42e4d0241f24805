"""Deterministic inode numbers for the one FUSE mount that serves every attached layer.

The mapping is pure arithmetic, so no per-inode Python object is ever created. The snapshotter's
metadata database stores each layer's slot, so a restarted daemon that re-attaches its layers
with the same slots computes the same numbers:

* inode 1, ``pyfuse3.ROOT_INODE``, is the mount root, whose children are the attached layers;
* a layer attached at slot ``s``, where ``1 <= s < 2**31``, owns the inodes whose high 32 bits
  are ``s`` and whose low 32 bits are ``entry + 1``. Its root directory, entry 0, is
  ``s << 32 | 1``, and entry ids up to ``2**32 - 2`` fit;
* in single-layer mode, used by ``lazysnap mount --blob``, the layer's root *is* the mount root:
  entry 0 of the layer at ``SINGLE_LAYER_SLOT`` maps to inode 1 and back; other entries keep the
  rule above.

File and directory handles are the inode number itself, so they carry no per-open state either.
"""

from __future__ import annotations

from typing import Final

MOUNT_ROOT_INODE: Final = 1
SLOT_SHIFT: Final = 32
ENTRY_MASK: Final = (1 << SLOT_SHIFT) - 1
MAX_SLOT: Final = (1 << 31) - 1
MAX_ENTRY: Final = ENTRY_MASK - 1
SINGLE_LAYER_SLOT: Final = 1


class InodeMap:
    """Converts between FUSE inode numbers and pairs of layer slot and entry id."""

    __slots__ = ("_single_layer",)

    def __init__(self, *, single_layer: bool = False) -> None:
        self._single_layer = single_layer

    @property
    def single_layer(self) -> bool:
        return self._single_layer

    def inode(self, slot: int, entry: int) -> int:
        if not 1 <= slot <= MAX_SLOT:
            raise ValueError(f"layer slot out of range: {slot}")
        if not 0 <= entry <= MAX_ENTRY:
            raise ValueError(f"entry id out of range: {entry}")
        if self._single_layer and slot == SINGLE_LAYER_SLOT and entry == 0:
            return MOUNT_ROOT_INODE
        return (slot << SLOT_SHIFT) | (entry + 1)

    def decode(self, inode: int) -> tuple[int, int] | None:
        """``(slot, entry)`` for a layer inode; None for the mount root of a multi-layer mount.

        Raises ValueError for numbers this mapping never hands out.
        """
        if inode == MOUNT_ROOT_INODE:
            return (SINGLE_LAYER_SLOT, 0) if self._single_layer else None
        slot = inode >> SLOT_SHIFT
        low = inode & ENTRY_MASK
        if not 1 <= slot <= MAX_SLOT or low == 0:
            raise ValueError(f"not a lazysnap inode: {inode}")
        return slot, low - 1
