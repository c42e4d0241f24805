"""Big chunks and holes cost memory and CPU in proportion to the read, not to the chunk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard

from fusefs.cache import ChunkCache
from fusefs.fetcher import ChunkFetcher, FetchConfig
from fusefs.formats import IndexLimits
from fusefs.formats.builder import build_index
from fusefs.index import Codec, LayerIndex
from fusefs.layer import Layer
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

KiB = 1024
MiB = 1024 * KiB
TiB = 1 << 40


@asynccontextmanager
async def fetcher_on(
    cache_dir: Path, index: LayerIndex, blob: FakeBlob, **config: int
) -> AsyncIterator[tuple[ChunkFetcher, Layer]]:
    cache = await ChunkCache.open(cache_dir, capacity_bytes=1 << 30)
    async with trio.open_nursery() as nursery:
        decoder = fake_decoder if isinstance(index, FakeIndex) else None
        fetcher = ChunkFetcher(cache, nursery, FetchConfig(**config), decoder)
        yield fetcher, Layer("l1", 1, blob, index)
        nursery.cancel_scope.cancel()


def sparse_layer() -> tuple[LayerIndex, FakeBlob, bytes]:
    """A zstd:chunked file of the largest size: 4 KiB of data, then one hole to the end."""
    head = os.urandom(4 * KiB)
    frame = zstandard.ZstdCompressor().compress(head)
    blob = b"HEADER--" + frame + b"TOC"
    size = IndexLimits().max_file_size
    digest = "sha256:" + hashlib.sha256(head).hexdigest()
    entries: list[dict[str, Any]] = [
        {"name": "sparse", "type": "reg", "size": size, "offset": 8, "endOffset": 8 + len(frame),
         "chunkSize": len(head), "chunkDigest": digest, "digest": digest},
        {"name": "sparse", "type": "chunk", "offset": 8 + len(frame), "chunkOffset": len(head),
         "chunkSize": size - len(head), "chunkType": "zeros"},
    ]  # fmt: skip
    index = build_index(
        entries,
        codec=Codec.ZSTD,
        toc_digest="sha256:" + "0" * 64,
        payload_end=len(blob) - 3,
        limits=IndexLimits(),
    )
    return index, FakeBlob(blob), head


@trio_test
async def test_a_hole_larger_than_memory_reads_as_zeros(tmp_path: Path) -> None:
    index, blob, head = sparse_layer()
    entry = index.lookup(0, b"sparse")
    assert entry is not None
    async with fetcher_on(tmp_path / "cache", index, blob) as (fetcher, layer):
        assert await fetcher.read(layer, entry, 2 * TiB, 128 * KiB) == bytes(128 * KiB)
        # Across the end of the data chunk into the hole, and the last bytes of the file.
        assert await fetcher.read(layer, entry, 0, 8 * KiB) == head + bytes(4 * KiB)
        end = index.attr(entry).size
        assert await fetcher.read(layer, entry, end - 100, 4 * KiB) == bytes(100)


class HashedBytes:
    """Counts the bytes hashed with sha256 (the chunk verification the read path does)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        real: Callable[..., Any] = hashlib.sha256

        def counting(data: bytes | memoryview = b"", **kwargs: Any) -> Any:
            self.total += len(data)
            return real(data, **kwargs)

        monkeypatch.setattr(hashlib, "sha256", counting)


def big_chunk_layer(size: int) -> tuple[FakeIndex, bytes]:
    content = os.urandom(size)
    return FakeIndex([FakeEntry("big", content=content)], chunk_size=size), content


@trio_test
async def test_a_cached_big_chunk_is_not_rehashed_whole_for_each_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, content = big_chunk_layer(8 * MiB)
    entry = index.by_path["big"]
    # The in-memory chunks are smaller than the chunk: every read goes to the disk cache.
    async with fetcher_on(tmp_path / "cache", index, FakeBlob(index.blob_bytes),
                          hot_bytes=1 * MiB) as (fetcher, layer):  # fmt: skip
        assert await fetcher.read(layer, entry, 0, 4 * KiB) == content[: 4 * KiB]
        await fetcher.writes_done()
        hashed = HashedBytes(monkeypatch)
        offsets = [i * 512 * KiB for i in range(16)]
        for offset in offsets:
            assert await fetcher.read(layer, entry, offset, 128 * KiB) == content[
                offset : offset + 128 * KiB
            ]
        # One 1 MiB block per read at most; the whole chunk each time was 128 MiB.
        assert hashed.total <= len(offsets) * MiB
        assert fetcher.cache.usage().verify_failures == 0


@trio_test
async def test_after_a_restart_a_big_chunk_is_verified_whole_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, content = big_chunk_layer(8 * MiB)
    entry = index.by_path["big"]
    blob = FakeBlob(index.blob_bytes)
    async with fetcher_on(tmp_path / "cache", index, blob) as (fetcher, layer):
        await fetcher.read(layer, entry, 0, 4 * KiB)
        await fetcher.writes_done()
    requests = len(blob.requests)
    hashed = HashedBytes(monkeypatch)
    async with fetcher_on(tmp_path / "cache", index, blob, hot_bytes=1 * MiB) as (fetcher, layer):
        for offset in range(0, 8 * MiB, 256 * KiB):
            assert await fetcher.read(layer, entry, offset, 4 * KiB) == content[
                offset : offset + 4 * KiB
            ]
    assert len(blob.requests) == requests  # all from the disk cache
    # The first load hashes the chunk whole against its digest and then its blocks; the 31
    # other reads one block each. Loading it whole for each read hashed 32 x 8 MiB.
    assert hashed.total <= 2 * 8 * MiB + 31 * MiB


def cache_file(cache_dir: Path) -> Path:
    (found,) = [p for p in cache_dir.rglob("sha256-*") if p.is_file()]
    return found


@trio_test
async def test_a_block_changed_on_disk_is_never_served(tmp_path: Path) -> None:
    index, content = big_chunk_layer(8 * MiB)
    entry = index.by_path["big"]
    blob = FakeBlob(index.blob_bytes)
    async with fetcher_on(tmp_path / "cache", index, blob, hot_bytes=1 * MiB) as (fetcher, layer):
        await fetcher.read(layer, entry, 0, 4 * KiB)
        await fetcher.writes_done()
        assert await fetcher.read(layer, entry, 3 * MiB, 4 * KiB) == content[3 * MiB : 3 * MiB + 4 * KiB]
        # Another program flips one byte of the cached chunk, keeping its size.
        path = cache_file(tmp_path / "cache")
        with open(path, "r+b") as f:
            f.seek(3 * MiB + 100)
            byte = f.read(1)
            f.seek(3 * MiB + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
        requests = len(blob.requests)
        assert await fetcher.read(layer, entry, 3 * MiB, 4 * KiB) == content[3 * MiB : 3 * MiB + 4 * KiB]
        assert fetcher.cache.usage().verify_failures == 1
        assert len(blob.requests) > requests  # fetched again from the blob
        # A file cut short is caught the same way.
        await fetcher.writes_done()
        path = cache_file(tmp_path / "cache")
        os.truncate(path, 5 * MiB)
        assert await fetcher.read(layer, entry, 7 * MiB, 4 * KiB) == content[7 * MiB : 7 * MiB + 4 * KiB]
        assert fetcher.cache.usage().verify_failures == 2
