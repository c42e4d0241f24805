"""``LazyHandlers.whole_file``: what FUSE passthrough copies, only ever from verified chunks."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from fusefs.cache import ChunkCache, chunk_key
from fusefs.fetcher import ChunkFetcher
from fusefs.handlers import LazyHandlers
from fusefs.inodes import InodeMap
from fusefs.layer import Layer
from fusefs.table import LayerTable
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder, trio_test

CONTENT = os.urandom(200_000)  # four 64 KiB chunks


@asynccontextmanager
async def handlers(
    tmp_path: Path, *, with_digests: bool = True
) -> AsyncIterator[tuple[LazyHandlers, ChunkFetcher, Layer, int]]:
    index = FakeIndex([FakeEntry("f", content=CONTENT)], with_digests=with_digests)
    table = LayerTable()
    layer = Layer("layer-a", 1, FakeBlob(index.blob_bytes), index)
    table.add(layer)
    cache = await ChunkCache.open(tmp_path / "cache", capacity_bytes=1 << 30)
    inodes = InodeMap(single_layer=True)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, decoder=fake_decoder)
        ops = LazyHandlers(table, fetcher, inodes, mount_time_ns=5)
        yield ops, fetcher, layer, inodes.inode(1, index.by_path["f"])
        nursery.cancel_scope.cancel()


async def _content(ops: LazyHandlers, inode: int) -> bytes:
    whole = ops.whole_file(inode)
    assert whole is not None and whole.size == len(CONTENT)
    return b"".join([piece async for piece in whole.pieces()])


@trio_test
async def test_a_file_is_whole_once_every_chunk_is_cached(tmp_path: Path) -> None:
    async with handlers(tmp_path) as (ops, fetcher, layer, inode):
        assert ops.whole_file(inode) is None  # nothing cached yet
        assert ops.whole_file(1 << 40) is None  # an unknown inode
        assert await ops.read(inode, 0, len(CONTENT)) == CONTENT
        await fetcher.writes_done()
        assert await _content(ops, inode) == CONTENT
        assert ops.file_identity(inode) == (layer.digest, layer.index.lookup(0, b"f"))


@trio_test
async def test_a_chunk_changed_on_disk_is_never_copied(tmp_path: Path) -> None:
    async with handlers(tmp_path) as (ops, fetcher, layer, inode):
        assert await ops.read(inode, 0, len(CONTENT)) == CONTENT
        await fetcher.writes_done()
        first = layer.index.chunks(layer.index.lookup(0, b"f") or 0)[0]
        key = chunk_key(first, layer.digest)
        path = tmp_path / "cache" / key.split("-")[1][:2] / key
        with open(path, "r+b") as f:
            f.write(b"X" * 16)  # same size, wrong bytes
        # The load checks the digest, drops the file and fetches the chunk again.
        assert await _content(ops, inode) == CONTENT


@trio_test
async def test_chunks_without_a_digest_are_not_enough(tmp_path: Path) -> None:
    async with handlers(tmp_path, with_digests=False) as (ops, fetcher, _, inode):
        assert await ops.read(inode, 0, len(CONTENT)) == CONTENT
        await fetcher.writes_done()
        assert ops.whole_file(inode) is None
