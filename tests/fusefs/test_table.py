from __future__ import annotations

import pytest

from fusefs.layer import Layer
from fusefs.table import LayerTable, check_layer_id
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex


def layer(layer_id: str, slot: int) -> Layer:
    index = FakeIndex([FakeEntry("f", content=b"x")])
    return Layer(layer_id, slot, FakeBlob(index.blob_bytes), index)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "nul\0", "x" * 256])
def test_layer_ids_must_be_one_path_component(bad: str) -> None:
    with pytest.raises(ValueError, match="layer id"):
        check_layer_id(bad)


def test_slots_are_not_reused_after_detach() -> None:
    table = LayerTable()
    table.add(layer("a", table.free_slot()))
    table.add(layer("b", table.free_slot()))
    table.remove("b")
    assert table.free_slot() == 3  # the kernel may still cache slot 2's inodes
    table.add(layer("pinned", 7))  # the daemon pins the slots it stored
    assert table.free_slot() == 8
    assert [x.layer_id for x in table.layers()] == ["a", "pinned"]


def test_duplicates_are_refused() -> None:
    table = LayerTable()
    table.add(layer("a", 1))
    with pytest.raises(ValueError, match="already attached"):
        table.add(layer("a", 2))
    with pytest.raises(ValueError, match="slot already in use"):
        table.add(layer("b", 1))
    with pytest.raises(KeyError):
        table.remove("zzz")
