from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fusefs import BlobReader, LocalFileBlob
from tests.integration.fuse_support import trio_test


@trio_test
async def test_reads_ranges_and_hashes_off_thread(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob"
    path.write_bytes(data)
    blob = await LocalFileBlob.open(path)
    try:
        assert isinstance(blob, BlobReader)
        assert blob.size == len(data)
        assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert await blob.read_at(1000, 70_000) == data[1000:71_000]
        assert await blob.read_at(len(data), 0) == b""
        with pytest.raises(ValueError, match="outside blob"):
            await blob.read_at(len(data) - 10, 11)
        with pytest.raises(ValueError, match="outside blob"):
            await blob.read_at(-1, 5)
    finally:
        blob.close()


def test_a_given_digest_is_not_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    blob = LocalFileBlob(path, digest="sha256:" + "0" * 64)
    assert blob.digest == "sha256:" + "0" * 64
    blob.close()
    blob.close()  # idempotent


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LocalFileBlob(tmp_path / "missing")
