from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusefs.inodes import MAX_ENTRY, MAX_SLOT, MOUNT_ROOT_INODE, InodeMap


@given(st.integers(1, MAX_SLOT), st.integers(0, MAX_ENTRY))
def test_multi_layer_inodes_round_trip(slot: int, entry: int) -> None:
    inodes = InodeMap()
    inode = inodes.inode(slot, entry)
    assert inode != MOUNT_ROOT_INODE
    assert inodes.decode(inode) == (slot, entry)


def test_documented_layout() -> None:
    inodes = InodeMap()
    assert inodes.inode(1, 0) == (1 << 32) | 1
    assert inodes.inode(3, 41) == (3 << 32) | 42
    assert inodes.decode(MOUNT_ROOT_INODE) is None


def test_single_layer_root_is_mount_root() -> None:
    inodes = InodeMap(single_layer=True)
    assert inodes.inode(1, 0) == MOUNT_ROOT_INODE
    assert inodes.decode(MOUNT_ROOT_INODE) == (1, 0)
    assert inodes.decode(inodes.inode(1, 7)) == (1, 7)


@pytest.mark.parametrize("inode", [0, 2, 1 << 32, (1 << 63) | 5])
def test_foreign_numbers_are_rejected(inode: int) -> None:
    with pytest.raises(ValueError, match="not a lazysnap inode"):
        InodeMap().decode(inode)


def test_out_of_range_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="slot"):
        InodeMap().inode(0, 1)
    with pytest.raises(ValueError, match="entry"):
        InodeMap().inode(1, MAX_ENTRY + 1)
