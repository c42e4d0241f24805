"""Saved TOC ranges serve a restarted daemon; damaged tail files are refused, never trusted."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fusefs import forget_redirect
from snapshotter.remote.saved_toc import (
    DeferredBlob,
    RecordingBlob,
    SavedTocBlob,
    SavedTocError,
    load_saved_toc,
    save_toc_ranges,
)

DATA = bytes(range(256)) * 64
DIGEST = "sha256:" + "0" * 64


class BytesBlob:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def digest(self) -> str:
        return DIGEST

    async def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def test_recorded_ranges_round_trip_and_serve_locally(tmp_path: Path) -> None:
    async def scenario() -> None:
        source = BytesBlob(DATA)
        recording = RecordingBlob(source)
        assert await recording.read_at(len(DATA) - 100, 100) == DATA[-100:]
        assert await recording.read_at(10, 20) == DATA[10:30]
        save_toc_ranges(tmp_path / "x.tail", DIGEST, recording.ranges)

        later = BytesBlob(DATA)
        served = SavedTocBlob(later, load_saved_toc(tmp_path / "x.tail", DIGEST))
        assert await served.read_at(len(DATA) - 50, 50) == DATA[-50:]
        assert await served.read_at(12, 5) == DATA[12:17]
        assert later.reads == [], "saved ranges need no network"
        assert await served.read_at(1000, 10) == DATA[1000:1010]
        assert later.reads == [(1000, 10)]

    trio.run(scenario)


def test_deferred_blob_opens_on_first_read_only() -> None:
    opened: list[int] = []

    async def opener() -> BytesBlob:
        opened.append(1)
        return BytesBlob(DATA)

    async def scenario() -> None:
        blob = DeferredBlob(DIGEST, len(DATA), opener)
        assert blob.size == len(DATA) and blob.digest == DIGEST and opened == []
        assert await blob.read_at(0, 4) == DATA[:4]
        assert await blob.read_at(4, 4) == DATA[4:8]
        assert opened == [1]

    trio.run(scenario)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-10], "truncated"),
        (lambda raw: b"garbage" + raw, "not a lazysnap tail file"),
        (lambda raw: raw[:13] + b"#" + raw[14:], "bad header"),
    ],
)
def test_damaged_tail_files_are_refused(tmp_path: Path, damage: object, message: str) -> None:
    path = tmp_path / "x.tail"
    save_toc_ranges(path, DIGEST, {0: DATA[:100], 500: DATA[500:700]})
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(SavedTocError, match=message):
        load_saved_toc(path, DIGEST)


def test_tail_of_another_blob_is_refused(tmp_path: Path) -> None:
    save_toc_ranges(tmp_path / "x.tail", DIGEST, {0: b"abc"})
    with pytest.raises(SavedTocError, match="saved for"):
        load_saved_toc(tmp_path / "x.tail", "sha256:" + "1" * 64)
    with pytest.raises(SavedTocError):
        load_saved_toc(tmp_path / "missing.tail", DIGEST)


class RedirectingBlob:
    size = 10
    digest = "sha256:" + "0" * 64

    def __init__(self) -> None:
        self.forgotten = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        return b"x" * length

    def forget_redirect(self) -> None:
        self.forgotten += 1


def test_wrappers_pass_forget_redirect_to_the_registry_blob() -> None:
    inner = RedirectingBlob()
    forget_redirect(RecordingBlob(SavedTocBlob(inner, {})))
    assert inner.forgotten == 1

    async def opener() -> RedirectingBlob:
        return inner

    deferred = DeferredBlob(inner.digest, inner.size, opener)
    forget_redirect(deferred)  # nothing opened yet: nothing to forget
    assert inner.forgotten == 1
    trio.run(deferred.read_at, 0, 1)
    forget_redirect(deferred)
    assert inner.forgotten == 2
