"""Layer slots are never handed out twice while a FUSE connection lives, across processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusefs.slot_mark import RESERVE_BLOCK, SlotMark, SlotMarkError
from fusefs.table import LayerTable
from tests.fusefs.test_table import layer


def test_a_new_table_starts_above_every_slot_an_earlier_one_handed_out(tmp_path: Path) -> None:
    path = tmp_path / "slots"
    handed: list[int] = []
    table = LayerTable(SlotMark(path, fresh_connection=True))
    for i in range(RESERVE_BLOCK + 3):  # across a block boundary
        slot = table.free_slot()
        table.add(layer(f"l{i}", slot))
        handed.append(slot)
        table.remove(f"l{i}")
    assert len(set(handed)) == len(handed)
    # A process that takes the connection over, with every layer removed.
    again = LayerTable(SlotMark(path, fresh_connection=False))
    assert again.free_slot() > max(handed)


def test_without_a_mark_a_new_process_would_start_at_slot_one() -> None:
    # What the mark prevents: nothing else remembers slots of removed layers.
    assert LayerTable().free_slot() == 1


def test_an_unreadable_mark_is_an_error_only_on_a_connection_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "slots"
    path.write_text("garbage")
    with pytest.raises(SlotMarkError, match="not a number"):
        SlotMark(path, fresh_connection=False)
    mark = SlotMark(path, fresh_connection=True)
    assert mark.first_unreserved == 1
    mark.reserve(1)
    assert SlotMark(path, fresh_connection=False).first_unreserved == RESERVE_BLOCK + 1
