from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from fusefs import cache as cache_module
from fusefs.cache import ChunkCache, ChunkIntegrityError, chunk_key
from fusefs.index import ChunkRef
from tests.integration.fuse_support import trio_test


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def key_of(data: bytes) -> str:
    return chunk_key(ChunkRef(0, len(data), 0, 1, 0, digest(data)), "sha256:" + "a" * 64)


@trio_test
async def test_store_then_load_returns_the_bytes(tmp_path: Path) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    data = b"hello chunk"
    await cache.store(key_of(data), data, digest(data))
    assert await cache.load(key_of(data), digest(data)) == data
    usage = cache.usage()
    assert (usage.bytes, usage.chunks, usage.hits, usage.stores) == (len(data), 1, 1, 1)


@trio_test
async def test_identical_chunks_of_two_layers_share_one_key(tmp_path: Path) -> None:
    data = b"same bytes"
    ref_a = ChunkRef(0, len(data), 100, 200, 0, digest(data))
    ref_b = ChunkRef(4096, len(data), 7, 50, 0, digest(data))
    assert chunk_key(ref_a, "sha256:" + "a" * 64) == chunk_key(ref_b, "sha256:" + "b" * 64)


@trio_test
async def test_chunks_without_digest_are_keyed_by_blob_position() -> None:
    ref = ChunkRef(0, 10, 100, 200, 5, None)
    key_a = chunk_key(ref, "sha256:" + "a" * 64)
    assert key_a != chunk_key(ref, "sha256:" + "b" * 64)
    assert key_a.startswith("blob-") and key_a.endswith("-100-5-10")


@trio_test
async def test_mismatching_bytes_are_rejected_and_not_stored(tmp_path: Path) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    good = b"the promised bytes"
    with pytest.raises(ChunkIntegrityError, match="digest mismatch"):
        await cache.store(key_of(good), b"other bytes", digest(good))
    assert key_of(good) not in cache
    assert cache.usage().verify_failures == 1
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


@trio_test
async def test_malformed_digest_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="malformed digest"):
        chunk_key(ChunkRef(0, 1, 0, 1, 0, "sha256:../../etc/passwd"), "sha256:" + "a" * 64)


@trio_test
async def test_lru_eviction_keeps_the_recently_used(tmp_path: Path) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=250)
    chunks = [bytes([i]) * 100 for i in range(3)]
    await cache.store(key_of(chunks[0]), chunks[0], digest(chunks[0]))
    await cache.store(key_of(chunks[1]), chunks[1], digest(chunks[1]))
    assert await cache.load(key_of(chunks[0]), digest(chunks[0])) == chunks[0]  # now newest
    await cache.store(key_of(chunks[2]), chunks[2], digest(chunks[2]))
    assert key_of(chunks[0]) in cache and key_of(chunks[2]) in cache
    assert key_of(chunks[1]) not in cache
    assert cache.usage().bytes == 200 and cache.usage().evictions == 1
    assert len([p for p in tmp_path.rglob("sha256-*")]) == 2


@trio_test
async def test_cache_survives_restart_with_lru_order(tmp_path: Path) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1000)
    chunks = [bytes([i]) * 100 for i in range(3)]
    for i, data in enumerate(chunks):
        await cache.store(key_of(data), data, digest(data))
        os.utime(cache._path(key_of(data)), ns=(i * 10**9, i * 10**9))
    assert await cache.load(key_of(chunks[0]), digest(chunks[0])) == chunks[0]  # touched
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ".tmp-deadbeef").write_bytes(b"partial write")
    reopened = await ChunkCache.open(tmp_path, capacity_bytes=250)
    # Over capacity at open: the oldest by mtime (chunk 1) goes first.
    assert key_of(chunks[1]) not in reopened
    assert await reopened.load(key_of(chunks[0]), digest(chunks[0])) == chunks[0]
    assert await reopened.load(key_of(chunks[2]), digest(chunks[2])) == chunks[2]
    assert not (tmp_path / "ab" / ".tmp-deadbeef").exists()


@trio_test
async def test_a_write_that_fails_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)

    write_new_file = cache_module._write_new_file

    def full_disk(path: str, data: bytes) -> None:
        write_new_file(path, data[:10])  # part of the chunk lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module, "_write_new_file", full_disk)
    chunks = [bytes([i]) * 1000 for i in range(20)]
    for data in chunks:
        with pytest.raises(OSError) as failed:
            await cache.store(key_of(data), data, digest(data))
        assert failed.value.errno == errno.ENOSPC
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert cache.usage().chunks == 0


@trio_test
async def test_corrupt_file_on_disk_is_a_miss_and_removed(tmp_path: Path) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    data = b"x" * 1000
    await cache.store(key_of(data), data, digest(data))
    path = cache._path(key_of(data))
    path.write_bytes(b"y" + data[1:])
    assert await cache.load(key_of(data), digest(data)) is None
    assert not path.exists() and key_of(data) not in cache
    assert cache.usage().verify_failures == 1


@trio_test
async def test_file_removed_behind_our_back_is_a_miss(tmp_path: Path) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    data = b"z" * 10
    await cache.store(key_of(data), data, digest(data))
    cache._path(key_of(data)).unlink()
    assert await cache.load(key_of(data), digest(data)) is None
    assert cache.usage().bytes == 0


@trio_test
async def test_capacity_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capacity"):
        await ChunkCache.open(tmp_path, capacity_bytes=0)


@trio_test
async def test_a_shard_directory_is_made_once_not_before_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = await ChunkCache.open(tmp_path, capacity_bytes=1 << 20)
    made: list[str] = []
    real_makedirs = os.makedirs

    def counted_makedirs(name: str, *args: Any, **kwargs: Any) -> None:
        made.append(name)
        real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(cache_module.os, "makedirs", counted_makedirs)
    # Keys by blob position share the first hex digits of the blob digest: one shard.
    chunks = [bytes([i]) * 1000 for i in range(5)]
    keys = [chunk_key(ChunkRef(i * 1000, 1000, i * 1000, i * 1000 + 1000, 0, None),
                      "sha256:" + "ab" * 32) for i in range(5)]
    for key, data in zip(keys, chunks, strict=True):
        await cache.store(key, data, None)
    assert len(made) == 1
    # A shard removed behind the cache's back is made again on its next write.
    await trio.to_thread.run_sync(shutil.rmtree, made[0])
    await cache.store(keys[0], chunks[0], None)
    assert await cache.load(keys[0], None) == chunks[0]
    assert len(made) == 2
