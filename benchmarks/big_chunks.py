"""Memory and time of reads from hostile or big chunks (issue 15, item 4).

Three cases, each in a child process so its peak RSS is its own:

* ``giant``: a zstd:chunked file that is one 1 GiB chunk (about 32 KiB compressed): index it and
  read 4 KiB. With a chunk size limit the index refuses it.
* ``hole``: a file of 4 TiB that is one ``zeros`` chunk after 4 KiB of data: read 128 KiB at 2 TiB.
* ``cached``: a 64 MiB chunk (the largest the default limit allows) already in the disk cache,
  read 16 times 128 KiB with an in-memory budget smaller than the chunk, as a reader of a big
  file gets once the chunk has left memory. Its peak RSS is mostly the benchmark's own copies of
  the chunk (content, compressed frame, blob).

Run ``.venv/bin/python benchmarks/big_chunks.py``; ``PYTHONPATH=<another checkout>`` measures
another version of ``fusefs`` with the same script.
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import zstandard

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
CASES = ("giant", "hole", "cached")


class MemoryBlob:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self._digest = "sha256:" + hashlib.sha256(data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def digest(self) -> str:
        return self._digest

    async def read_at(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.data[offset : offset + length]


def zstd_frame_of_repeated(byte: int, size: int) -> tuple[bytes, str]:
    """A zstd frame of ``size`` copies of ``byte``, made without holding them all."""
    compressor = zstandard.ZstdCompressor().compressobj()
    piece = bytes([byte]) * MiB
    digest = hashlib.sha256()
    out = bytearray()
    for _ in range(size // MiB):
        out += compressor.compress(piece)
        digest.update(piece)
    out += compressor.flush()
    return bytes(out), "sha256:" + digest.hexdigest()


def layer_of(entries: list[dict[str, Any]], blob: bytes, payload_end: int) -> Any:
    from fusefs.formats import IndexLimits  # noqa: PLC0415
    from fusefs.formats.builder import build_index  # noqa: PLC0415
    from fusefs.index import Codec  # noqa: PLC0415
    from fusefs.layer import Layer  # noqa: PLC0415

    index = build_index(
        entries,
        codec=Codec.ZSTD,
        toc_digest="sha256:" + "0" * 64,
        payload_end=payload_end,
        limits=IndexLimits(),
    )
    return Layer("bench", 1, MemoryBlob(blob), index)


async def with_fetcher(cache_dir: Path, hot_bytes: int, body: Any) -> Any:
    from fusefs.cache import ChunkCache  # noqa: PLC0415
    from fusefs.fetcher import ChunkFetcher, FetchConfig  # noqa: PLC0415

    cache = await ChunkCache.open(cache_dir, capacity_bytes=8 * GiB)
    async with trio.open_nursery() as nursery:
        fetcher = ChunkFetcher(cache, nursery, FetchConfig(hot_bytes=hot_bytes))
        result = await body(fetcher)
        nursery.cancel_scope.cancel()
    return result


def case_giant(scratch: Path) -> str:
    frame, digest = zstd_frame_of_repeated(1, GiB)
    blob = b"HEADER--" + frame + b"TOC"
    entry = {"name": "giant", "type": "reg", "size": GiB, "offset": 8,
             "endOffset": 8 + len(frame), "digest": digest}  # fmt: skip
    started = time.perf_counter()
    try:
        layer = layer_of([entry], blob, len(blob) - 3)
    except Exception as exc:  # the limit: refused when the index is built
        return f"refused in {time.perf_counter() - started:.3f} s ({type(exc).__name__})"
    file_id = layer.index.lookup(0, b"giant")

    async def read(fetcher: Any) -> int:
        return len(await fetcher.read(layer, file_id, 0, 4 * KiB))

    got = trio.run(with_fetcher, scratch / "cache", 32 * MiB, read)
    return f"read {got} B in {time.perf_counter() - started:.2f} s"


def case_hole(scratch: Path) -> str:
    head = os.urandom(4 * KiB)
    frame = zstandard.ZstdCompressor().compress(head)
    blob = b"HEADER--" + frame + b"TOC"
    size = 4 * TiB
    digest = "sha256:" + hashlib.sha256(head).hexdigest()
    entries = [
        {"name": "sparse", "type": "reg", "size": size, "offset": 8, "endOffset": 8 + len(frame),
         "chunkSize": len(head), "chunkDigest": digest, "digest": digest},
        {"name": "sparse", "type": "chunk", "offset": 8 + len(frame), "chunkOffset": len(head),
         "chunkSize": size - len(head), "chunkType": "zeros"},
    ]  # fmt: skip
    layer = layer_of(entries, blob, len(blob) - 3)
    file_id = layer.index.lookup(0, b"sparse")
    started = time.perf_counter()

    async def read(fetcher: Any) -> int:
        return len(await fetcher.read(layer, file_id, 2 * TiB, 128 * KiB))

    outcome = ""
    try:
        got = trio.run(with_fetcher, scratch / "cache", 32 * MiB, read)
        outcome = f"read {got} B in {time.perf_counter() - started:.4f} s"
    except* MemoryError:  # the whole hole allocated at once
        outcome = f"MemoryError after {time.perf_counter() - started:.2f} s"
    return outcome


def case_cached(scratch: Path) -> str:
    content = os.urandom(64 * MiB)
    frame = zstandard.ZstdCompressor(level=1).compress(content)
    blob = b"HEADER--" + frame + b"TOC"
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    entry = {"name": "big", "type": "reg", "size": len(content), "offset": 8,
             "endOffset": 8 + len(frame), "digest": digest}  # fmt: skip
    layer = layer_of([entry], blob, len(blob) - 3)
    file_id = layer.index.lookup(0, b"big")
    offsets = [i * 4 * MiB + 256 * KiB for i in range(16)]

    async def reads(fetcher: Any) -> float:
        await fetcher.read(layer, file_id, 0, 4 * KiB)
        await fetcher.writes_done()
        started = time.perf_counter()
        for offset in offsets:
            part = await fetcher.read(layer, file_id, offset, 128 * KiB)
            assert part == content[offset : offset + 128 * KiB]
        return (time.perf_counter() - started) / len(offsets)

    per_read = trio.run(with_fetcher, scratch / "cache", 1 * MiB, reads)
    return f"{per_read * 1000:.1f} ms per 128 KiB read from the disk cache"


def child(case: str) -> None:
    import fusefs.fetcher  # noqa: PLC0415 (imported before any clock starts)
    import fusefs.formats.builder  # noqa: F401, PLC0415

    with tempfile.TemporaryDirectory(prefix="big-chunks.") as scratch:
        outcome = {"giant": case_giant, "hole": case_hole, "cached": case_cached}[case](
            Path(scratch)
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{case:8} {outcome}; peak RSS {peak_mb:.0f} MB")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return 0
    for case in CASES:
        done = subprocess.run(
            [sys.executable, __file__, "--child", case],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        print(done.stdout.strip() or f"{case:8} failed: {done.stderr.strip().splitlines()[-1:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
