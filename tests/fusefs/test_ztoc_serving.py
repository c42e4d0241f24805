"""Plain gzip layers served through a zTOC by the fetcher: reads, shared span inflation,
background fetch with the blob digest check, and a blob changed under its index."""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusefs.background import fetch_everything, hold_reader_bytes
from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher, FetchConfig, FetchError
from fusefs.formats.ztoc import ZtocLayer, build_ztoc, parse_ztoc
from fusefs.layer import Layer
from tests.fusefs.ztoc_support import lookup
from tests.integration.fuse_support import FakeBlob, trio_test
from tests.support.oci_image import TarBuilder

SPAN = 64 * 1024
RANDOM = random.Random(14)


def _words(size: int) -> bytes:
    """Text-like bytes: deflate codes them in Huffman blocks, whose boundaries fall inside
    bytes, so spans start at bit offsets (random bytes would give byte-aligned stored blocks)."""
    vocabulary = [RANDOM.randbytes(RANDOM.randint(2, 9)).hex().encode() for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        out += RANDOM.choice(vocabulary) + b" "
    return bytes(out[:size])


SMALL = {f"etc/f{i}": f"small file {i}\n".encode() * (i + 1) for i in range(40)}
BIG = _words(900 * 1024) + RANDOM.randbytes(100 * 1024)
TAR = TarBuilder().dir("etc")
for _name, _data in SMALL.items():
    TAR.file(_name, _data)
TAR.file("big", BIG)
BLOB = gzip.compress(TAR.tar(), mtime=0)
BUILT = build_ztoc(io.BytesIO(BLOB), span_size=SPAN)


def _ztoc() -> ZtocLayer:
    return parse_ztoc(BUILT.data, blob_size=len(BLOB), ztoc_digest=BUILT.digest)


@asynccontextmanager
async def _fetcher(
    tmp_path: Path, blob: FakeBlob, **config: int
) -> AsyncIterator[tuple[ChunkFetcher, Layer]]:
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, FetchConfig(**config))  # type: ignore[arg-type]
        yield fetcher, Layer("l1", 1, blob, _ztoc())
        nursery.cancel_scope.cancel()


def test_the_blob_has_several_spans_and_a_file_across_them() -> None:
    ztoc = _ztoc()
    assert len(ztoc.spans) >= 4
    assert len(ztoc.chunks(lookup(ztoc.index, "big"))) >= 3
    assert sum(1 for point in ztoc.spans.checkpoints if point.bits) >= 2


@trio_test
async def test_every_file_reads_back_identical(tmp_path: Path) -> None:
    async with _fetcher(tmp_path, FakeBlob(BLOB)) as (fetcher, layer):
        for name, data in [*SMALL.items(), ("big", BIG)]:
            entry = lookup(layer.index, name)
            assert await fetcher.read(layer, entry, 0, len(data) + 10) == data
        entry = lookup(layer.index, "big")
        middle = len(BIG) // 2
        assert await fetcher.read(layer, entry, middle, 100_000) == BIG[middle : middle + 100_000]


@trio_test
async def test_a_small_read_requests_less_than_the_blob(tmp_path: Path) -> None:
    blob = FakeBlob(BLOB)
    async with _fetcher(tmp_path, blob, file_completion_window=0) as (fetcher, layer):
        entry = lookup(layer.index, "big")
        offset = len(BIG) - 5000
        assert await fetcher.read(layer, entry, offset, 5000) == BIG[offset:]
        assert 0 < sum(length for _, length in blob.requests) < len(BLOB) // 2


async def _inflations_reading_small_files(tmp_path: Path, budget: int) -> int:
    async with _fetcher(tmp_path, FakeBlob(BLOB), inflated_span_bytes=budget) as (fetcher, layer):
        for name, data in SMALL.items():
            assert await fetcher.read(layer, lookup(layer.index, name), 0, 4096) == data
        return fetcher.flights.inflated_spans.inflations


@trio_test
async def test_small_files_of_one_span_inflate_it_once(tmp_path: Path) -> None:
    ztoc = _ztoc()
    assert len({ztoc.chunks(lookup(ztoc.index, n))[0].blob_offset for n in SMALL}) == 1
    # The first range also holds the first spans of the big file, coalesced after them.
    kept = await _inflations_reading_small_files(tmp_path / "kept", 16 << 20)
    none = await _inflations_reading_small_files(tmp_path / "none", 0)
    assert kept * 4 < len(SMALL) <= none


@trio_test
async def test_background_fetch_verifies_the_blob_digest(tmp_path: Path) -> None:
    async with _fetcher(tmp_path, FakeBlob(BLOB), background_range=SPAN) as (fetcher, layer):
        await fetch_everything(fetcher, layer)
        assert layer.stats.blob_verified is True
        entry = lookup(layer.index, "big")
        assert await fetcher.read(layer, entry, 0, len(BIG)) == BIG


@trio_test
async def test_background_fetch_of_another_blob_fails_the_digest_check(tmp_path: Path) -> None:
    other = FakeBlob(BLOB, digest="sha256:" + "0" * 64)
    async with _fetcher(tmp_path, other, background_range=SPAN) as (fetcher, layer):
        await fetch_everything(fetcher, layer)
        assert layer.stats.blob_verified is False


def _requested(blob: FakeBlob) -> int:
    return sum(length for _, length in blob.requests)


@trio_test
async def test_background_fetch_requests_only_what_readers_did_not(tmp_path: Path) -> None:
    blob = FakeBlob(BLOB)
    half = len(BIG) // 2
    async with _fetcher(tmp_path, blob, background_range=SPAN) as (fetcher, layer):
        hold_reader_bytes(fetcher, layer)
        assert await fetcher.read(layer, lookup(layer.index, "big"), 0, half) == BIG[:half]
        read = _requested(blob)
        await fetch_everything(fetcher, layer)
        assert layer.stats.blob_verified is True
        assert layer.stats.held_bytes_reused >= read // 2
        # Each range may carry one lead byte. A range readers fetched only in part comes again
        # whole: here the first one, whose gzip header no reader needed.
        assert _requested(blob) <= len(BLOB) + len(blob.requests) + 2 * SPAN
        assert layer.held is None  # the copy is dropped once the blob is checked
        assert await fetcher.read(layer, lookup(layer.index, "big"), 0, len(BIG)) == BIG


@trio_test
async def test_a_changed_held_copy_fails_the_blob_check_never_serves_wrong_bytes(
    tmp_path: Path,
) -> None:
    blob = FakeBlob(BLOB)
    # No fetch ahead of the read: it would keep good bytes over the changed one later on.
    # Background ranges of one chunk each, so the changed chunk's range is held whole.
    config = {"background_range": SPAN // 2, "file_completion_window": 0}
    async with _fetcher(tmp_path, blob, **config) as (fetcher, layer):
        hold_reader_bytes(fetcher, layer)
        entry = lookup(layer.index, "big")
        half = len(BIG) // 2
        assert await fetcher.read(layer, entry, 0, half) == BIG[:half]
        assert layer.held is not None
        # The first background range starts at 0, before any span, so it comes from the
        # registry: change a byte of a later chunk the read fetched. Its bytes are kept after
        # the read is answered.
        later = layer.index.chunks(entry)[2]
        with trio.fail_after(10):
            while not layer.held.holds(later.blob_offset - 1, later.blob_end):
                await trio.sleep(0.01)
        at = (later.blob_offset + later.blob_end) // 2
        await layer.held.keep(at, bytes([BLOB[at] ^ 0x40]))
        await fetch_everything(fetcher, layer)
        assert layer.stats.held_bytes_reused > 0
        assert layer.stats.blob_verified is False
        await _every_span_reads_right_or_eio(fetcher, layer, entry)


async def _every_span_reads_right_or_eio(fetcher: ChunkFetcher, layer: Layer, entry: int) -> None:
    """Read the big file span by span: each read gives its true bytes or FetchError (EIO)."""
    for offset in range(0, len(BIG), SPAN):
        try:
            data = await fetcher.read(layer, entry, offset, SPAN)
        except FetchError:
            continue  # EIO is an answer
        assert data == BIG[offset : offset + SPAN]


def _changed_blob() -> bytes:
    """The blob with one compressed byte flipped inside the big file's last span."""
    ztoc = _ztoc()
    last = ztoc.chunks(lookup(ztoc.index, "big"))[-1]
    at = (last.blob_offset + last.blob_end) // 2
    changed = bytearray(BLOB)
    changed[at] ^= 0x40
    return bytes(changed)


@trio_test
async def test_a_blob_changed_under_its_index_gives_eio_never_wrong_bytes(tmp_path: Path) -> None:
    blob = FakeBlob(_changed_blob(), digest=FakeBlob(BLOB).digest)
    async with _fetcher(tmp_path, blob) as (fetcher, layer):
        entry = lookup(layer.index, "big")
        with pytest.raises(FetchError):
            await fetcher.read(layer, entry, len(BIG) - 4096, 4096)
        assert layer.stats.verify_failures >= 1
        # Untouched spans still read right.
        assert await fetcher.read(layer, entry, 0, 4096) == BIG[:4096]


async def _held_all_read(layer: Layer, blob: FakeBlob) -> None:
    """Wait until the copy holds every byte readers requested (it is written after the read
    is answered)."""
    assert layer.held is not None
    with trio.fail_after(10):
        while layer.held.held_bytes < _requested(blob):
            await trio.sleep(0.01)


@trio_test
async def test_a_range_held_in_part_requests_only_its_gaps(tmp_path: Path) -> None:
    blob = FakeBlob(BLOB)
    half = len(BIG) // 2
    # One background range for the whole blob: readers hold it only in part.
    config = {"background_range": len(BLOB), "file_completion_window": 0}
    async with _fetcher(tmp_path, blob, **config) as (fetcher, layer):
        hold_reader_bytes(fetcher, layer)
        assert await fetcher.read(layer, lookup(layer.index, "big"), 0, half) == BIG[:half]
        await _held_all_read(layer, blob)
        read = _requested(blob)
        await fetch_everything(fetcher, layer)
        background = _requested(blob) - read
        assert layer.stats.blob_verified is True
        assert layer.stats.held_bytes_reused == read
        # Before, the range came again whole: len(BLOB) bytes.
        assert background == len(BLOB) - read
        assert await fetcher.read(layer, lookup(layer.index, "big"), 0, len(BIG)) == BIG


@trio_test
async def test_a_changed_held_piece_of_a_partly_held_range_fails_the_blob_check(
    tmp_path: Path,
) -> None:
    blob = FakeBlob(BLOB)
    config = {"background_range": len(BLOB), "file_completion_window": 0}
    async with _fetcher(tmp_path, blob, **config) as (fetcher, layer):
        hold_reader_bytes(fetcher, layer)
        entry = lookup(layer.index, "big")
        half = len(BIG) // 2
        assert await fetcher.read(layer, entry, 0, half) == BIG[:half]
        await _held_all_read(layer, blob)
        assert layer.held is not None
        later = layer.index.chunks(entry)[1]
        at = (later.blob_offset + later.blob_end) // 2
        assert layer.held.holds(at, at + 1)
        await layer.held.keep(at, bytes([BLOB[at] ^ 0x40]))
        await fetch_everything(fetcher, layer)
        assert layer.stats.held_bytes_reused > 0
        assert layer.stats.blob_verified is False
        await _every_span_reads_right_or_eio(fetcher, layer, entry)


def _span_requests(blob: FakeBlob, ztoc: ZtocLayer, name: str) -> int:
    """Requests that covered the compressed span of file ``name``'s first chunk."""
    begin, end = ztoc.fetch_range(ztoc.chunks(lookup(ztoc.index, name))[0])
    return sum(1 for offset, length in blob.requests if offset <= begin and end <= offset + length)


@trio_test
async def test_a_read_keeps_its_span_mates_so_neighbours_need_no_fetch(tmp_path: Path) -> None:
    blob = FakeBlob(BLOB)
    names = list(SMALL)
    # Ranges of one chunk: nothing coalesced after it, so one span is inflated in all.
    config = {"file_completion_window": 0, "ondemand_range": 1, "max_gap": 0}
    async with _fetcher(tmp_path, blob, **config) as (fetcher, layer):
        # The last small file first: the files before it in its span are not after it in blob
        # order, so only span mates bring them in.
        last = names[-1]
        assert await fetcher.read(layer, lookup(layer.index, last), 0, 4096) == SMALL[last]
        requests = len(blob.requests)
        for name in names[:-1]:
            assert await fetcher.read(layer, lookup(layer.index, name), 0, 4096) == SMALL[name]
        assert len(blob.requests) == requests
        assert fetcher.flights.inflated_spans.inflations == 1


@trio_test
async def test_concurrent_readers_of_one_span_fetch_and_inflate_it_once(tmp_path: Path) -> None:
    blob = FakeBlob(BLOB)
    gate = trio.Event()
    blob.gate = gate
    names = list(SMALL)
    first, last = names[0], names[-1]
    results: dict[str, bytes] = {}
    config = {"file_completion_window": 0, "ondemand_range": 1, "max_gap": 0}
    async with _fetcher(tmp_path, blob, **config) as (fetcher, layer):

        async def read(name: str) -> None:
            results[name] = await fetcher.read(layer, lookup(layer.index, name), 0, 4096)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, last)
            nursery.start_soon(read, first)
            await trio.sleep(0.2)  # both readers are waiting on the link
            gate.set()
        assert results == {first: SMALL[first], last: SMALL[last]}
        assert fetcher.flights.inflated_spans.inflations == 1
        assert _span_requests(blob, layer.index, first) == 1  # type: ignore[arg-type]
