"""Tracing: first reads and blob ranges reach each open recording, and nothing else does."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fusefs.handlers import LazyHandlers
from fusefs.inodes import InodeMap
from fusefs.stats import BACKGROUND, set_fetch_kind
from fusefs.trace import TRACE, FileRead, IndexReadBlob, RangeRead, Recording
from tests.fusefs.test_handlers import operations, read_errno
from tests.integration.fuse_support import FakeBlob, trio_test


def drained(recording: Recording) -> list[FileRead | RangeRead]:
    events = []
    while (event := recording.get(0)) is not None:
        events.append(event)
    return events


@pytest.fixture
def recording() -> Iterator[Recording]:
    started = TRACE.start()
    yield started
    TRACE.stop(started)
    assert not TRACE.active


def tool_inode(ops: LazyHandlers, inodes: InodeMap) -> int:
    bin_dir = ops.lookup(inodes.inode(1, 0), b"bin")
    return ops.lookup(bin_dir.ino, b"tool").ino


@trio_test
async def test_first_read_and_its_range_are_recorded_once(
    tmp_path: Path, recording: Recording
) -> None:
    async with operations(tmp_path) as (ops, inodes, _, table):
        tool = tool_inode(ops, inodes)
        assert await ops.read(tool, 0, 4) == b"#!/b"
        assert await ops.read(tool, 4, 100) == b"in/sh\necho hi\n"
        events = drained(recording)
        layer = table.get(1)
        assert layer is not None
    reads = [e for e in events if isinstance(e, FileRead)]
    ranges = [e for e in events if isinstance(e, RangeRead)]
    assert len(reads) == 1  # the second read of the file is not a first read
    read = reads[0]
    assert (read.layer, read.path, read.offset, read.size, read.file_size) == (
        "layer-a", "bin/tool", 0, 4, 18,
    )
    assert read.digest == layer.digest and read.wait >= 0 and read.error == ""
    assert ranges and all(r.kind == "on-demand" and r.error == "" for r in ranges)
    assert sum(r.length for r in ranges) == layer.stats.fetched_bytes
    assert all(r.digest == layer.digest for r in ranges)
    assert read.at <= ranges[0].at


@trio_test
async def test_nothing_is_recorded_outside_a_recording(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        tool = tool_inode(ops, inodes)
        assert not TRACE.active
        await ops.read(tool, 0, 4)
        late = TRACE.start()
        try:
            await ops.read(tool, 0, 4)  # cached now: a first read for this recording, no range
            events = drained(late)
        finally:
            TRACE.stop(late)
    assert [type(e) for e in events] == [FileRead]


@trio_test
async def test_each_recording_has_its_own_first_reads(tmp_path: Path) -> None:
    async with operations(tmp_path) as (ops, inodes, _, _):
        tool = tool_inode(ops, inodes)
        early = TRACE.start()
        try:
            await ops.read(tool, 0, 4)
            late = TRACE.start()
            try:
                await ops.read(tool, 0, 4)
                late_reads = [e for e in drained(late) if isinstance(e, FileRead)]
            finally:
                TRACE.stop(late)
            early_reads = [e for e in drained(early) if isinstance(e, FileRead)]
        finally:
            TRACE.stop(early)
    assert len(early_reads) == 1 and len(late_reads) == 1


@trio_test
async def test_a_failed_first_read_is_recorded_with_its_error(
    tmp_path: Path, recording: Recording
) -> None:
    async with operations(tmp_path) as (ops, inodes, _, table):
        layer = table.get(1)
        assert layer is not None and isinstance(layer.blob, FakeBlob)
        layer.blob.fail = True
        assert await read_errno(ops.read(tool_inode(ops, inodes), 0, 4)) == errno.EIO
        events = drained(recording)
    reads = [e for e in events if isinstance(e, FileRead)]
    ranges = [e for e in events if isinstance(e, RangeRead)]
    assert reads and reads[0].error and reads[0].path == "bin/tool"
    assert ranges and ranges[0].error == "OSError"


@trio_test
async def test_kind_follows_the_task_that_asked(recording: Recording) -> None:
    blob = FakeBlob(bytes(range(200)))

    async def background() -> None:
        set_fetch_kind(BACKGROUND)
        await TRACE.read_at(blob, 0, 10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(background)
    await TRACE.read_at(blob, 10, 10)  # the child's kind stayed in the child
    assert await IndexReadBlob(blob).read_at(100, 50) == blob.data[100:150]
    await TRACE.read_at(blob, 20, 10)
    kinds = [(e.kind, e.start, e.end) for e in drained(recording) if isinstance(e, RangeRead)]
    assert kinds == [
        ("background", 0, 10), ("on-demand", 10, 20), ("index", 100, 150), ("on-demand", 20, 30)
    ]


@trio_test
async def test_a_full_recording_drops_and_counts() -> None:
    blob = FakeBlob(bytes(100))
    small = TRACE.start(capacity=2)
    try:
        for offset in range(5):
            await TRACE.read_at(blob, offset, 1)
        assert len(drained(small)) == 2
        assert small.dropped == 3
    finally:
        TRACE.stop(small)
