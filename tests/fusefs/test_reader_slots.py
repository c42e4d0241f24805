"""Readers first for a blob's request slots (issue 13).

Before ``fusefs.request_slots``, a blob's ``blob_requests`` slots went first come, first served:
background fetch, file completion and readahead could hold all of them, and a container's read
miss waited for a background range to end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher, FetchConfig, ReadDeadlineExceeded
from fusefs.layer import ChunkTag, Layer
from fusefs.ranges import PlannedRange, group_chunks
from fusefs.request_slots import RequestSlots
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024
FILES = 10


class GatedBlob(FakeBlob):
    """A blob whose every range waits until the test opens its gate; it records the order in
    which ranges were asked for (their offsets) and which are in flight."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.gates: dict[int, trio.Event] = {}
        self.started: list[int] = []
        self.in_flight: set[int] = set()

    def gate_of(self, offset: int) -> trio.Event:
        return self.gates.setdefault(offset, trio.Event())

    async def read_at(self, offset: int, length: int) -> bytes:
        self.started.append(offset)
        self.in_flight.add(offset)
        try:
            await self.gate_of(offset).wait()
        finally:
            self.in_flight.discard(offset)
        return self.data[offset : offset + length]


class Setup:
    def __init__(self, fetcher: ChunkFetcher, nursery: trio.Nursery) -> None:
        self.contents = {f"f{i}": os.urandom(8 * KiB) for i in range(FILES)}
        self.index = FakeIndex([FakeEntry(name, content=c) for name, c in self.contents.items()])
        self.blob = GatedBlob(self.index.blob_bytes)
        self.layer = Layer("layer", 1, self.blob, self.index)
        self.fetcher = fetcher
        self.nursery = nursery
        self.read: dict[str, bytes] = {}
        self._answered: dict[str, trio.Event] = {}

    def planned(self, name: str) -> PlannedRange[ChunkTag]:
        entry = self.index.by_path[name]
        chunks = [((entry, n), ref) for n, ref in enumerate(self.index.chunks(entry))]
        (planned,) = group_chunks(chunks, max_range=1 << 30, max_gap=0)
        return planned

    def offset(self, name: str) -> int:
        return self.planned(name).start

    async def background(self, *names: str) -> None:
        """Start a background range for each file, in this order, each queued for a slot."""
        for name in names:
            self.nursery.start_soon(self.fetcher.flights.fetch_background, self.layer,
                                    self.planned(name))
            await trio.testing.wait_all_tasks_blocked()

    async def reader(self, name: str) -> None:
        """Start a reader of the file's first bytes, queued for a slot."""

        answered = self._answered[name] = trio.Event()

        async def read() -> None:
            entry = self.index.by_path[name]
            self.read[name] = await self.fetcher.read(self.layer, entry, 0, 100)
            answered.set()

        self.nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()

    async def finish(self, name: str) -> None:
        self.blob.gate_of(self.offset(name)).set()
        await trio.testing.wait_all_tasks_blocked()

    async def answered(self, *names: str) -> dict[str, bytes]:
        """What the readers of these files got (decoding runs on a worker thread)."""
        with trio.fail_after(5):
            for name in names:
                await self._answered[name].wait()
        return {name: self.read[name] for name in names}

    def started(self, name: str) -> bool:
        return self.offset(name) in self.blob.started


async def open_setup(
    tmp_path: Path, nursery: trio.Nursery, blob_requests: int, read_deadline: float = 30
) -> Setup:
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    config = FetchConfig(
        blob_requests=blob_requests,
        ondemand_range=1,  # a reader's miss is a range of its own file only
        max_gap=0,
        directory_misses=1000,
        read_deadline=read_deadline,
    )
    return Setup(ChunkFetcher(cache, nursery, config, fake_decoder), nursery)


@trio_test
async def test_a_reader_starts_at_once_while_background_work_saturates_the_blob(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        s = await open_setup(tmp_path, nursery, blob_requests=3)
        await s.background("f0", "f1", "f2", "f3", "f4")
        assert len(s.blob.in_flight) == 2, "background work leaves one slot free"
        await s.reader("f9")
        # No background range has finished, and the reader's request is on its way.
        assert s.started("f9")
        assert not s.blob.gates[s.offset("f0")].is_set()
        with trio.fail_after(5):
            await s.finish("f9")
        assert await s.answered("f9") == {"f9": s.contents["f9"][:100]}
        assert len(s.blob.in_flight) == 2  # the background ranges still wait for the link
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_waiting_reader_is_granted_before_waiting_background_requests(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        s = await open_setup(tmp_path, nursery, blob_requests=3)
        await s.background("f0", "f1")
        await s.reader("f8")  # the third slot
        await s.background("f2", "f3")  # queued first ...
        await s.reader("f9")  # ... and this reader after them
        assert set(s.blob.started) == {s.offset(n) for n in ("f0", "f1", "f8")}
        await s.finish("f0")
        assert s.started("f9") and not s.started("f2") and not s.started("f3")
        # Background requests among themselves: first come, first served.
        await s.finish("f1")
        assert s.started("f2") and not s.started("f3")
        with trio.fail_after(5):
            for name in ("f8", "f9", "f2", "f3"):
                await s.finish(name)
        assert await s.answered("f8", "f9") == {n: s.contents[n][:100] for n in ("f8", "f9")}
        nursery.cancel_scope.cancel()


@trio_test
async def test_background_range_a_reader_waits_on_goes_ahead_of_other_background_work(
    tmp_path: Path,
) -> None:
    # Readahead and file completion claim chunks before their request has a slot: a reader
    # that needs one of them waits on that request, which must not wait behind the others.
    async with trio.open_nursery() as nursery:
        s = await open_setup(tmp_path, nursery, blob_requests=3)
        await s.background("f0", "f1", "f2", "f3", "f4")
        assert not s.started("f4")
        await s.reader("f4")  # joins the flight of f4's queued background range
        assert s.started("f4") and not s.started("f2") and not s.started("f3")
        with trio.fail_after(5):
            await s.finish("f4")
        assert await s.answered("f4") == {"f4": s.contents["f4"][:100]}
        assert s.blob.started.count(s.offset("f4")) == 1  # the reader fetched nothing itself
        nursery.cancel_scope.cancel()


@trio_test
async def test_cancelled_background_requests_leak_no_slot(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        s = await open_setup(tmp_path, nursery, blob_requests=3)
        await s.background("f0", "f1")
        async with trio.open_nursery() as doomed:
            for name in ("f2", "f3", "f4"):
                doomed.start_soon(s.fetcher.flights.fetch_background, s.layer, s.planned(name))
            await trio.testing.wait_all_tasks_blocked()
            doomed.cancel_scope.cancel()  # as a detach cancels background fetch
        with trio.fail_after(5):
            await s.finish("f0")
            await s.finish("f1")
        assert not s.blob.in_flight
        # Both background slots and the reader's are free again.
        await s.background("f5", "f6", "f7")
        assert {s.offset("f5"), s.offset("f6")} == s.blob.in_flight
        await s.reader("f9")
        assert s.started("f9")
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_reader_behind_stalled_background_work_fails_at_its_deadline(
    tmp_path: Path,
) -> None:
    # Nothing ever answers: the reader's own request stalls too. It still gets EIO in time,
    # and the blob still holds at most blob_requests requests.
    async with trio.open_nursery() as nursery:
        s = await open_setup(tmp_path, nursery, blob_requests=3, read_deadline=0.3)
        await s.background("f0", "f1", "f2", "f3")
        for name in ("f8", "f9"):
            entry = s.index.by_path[name]
            started = trio.current_time()
            with trio.fail_after(5), pytest.raises(ReadDeadlineExceeded):
                await s.fetcher.read(s.layer, entry, 0, 100)
            assert trio.current_time() - started < 2
        assert s.started("f8") and not s.started("f9")  # f9's request waits for a slot
        assert len(s.blob.in_flight) == 3
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_slot_granted_to_a_cancelled_request_is_released() -> None:
    slots = RequestSlots(2)
    with trio.CancelScope() as scope:
        scope.cancel()  # granted at once, then cancelled at its first checkpoint
        async with slots.hold(lambda: True):
            pytest.fail("a cancelled request must not run")
    assert slots.idle and slots.held == 0


@trio_test
async def test_a_blob_with_one_slot_still_serves_background_work() -> None:
    slots = RequestSlots(1)
    with trio.fail_after(1):
        async with slots.hold(lambda: False):
            assert slots.background_held == 1
    assert slots.idle
