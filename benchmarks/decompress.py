#!/usr/bin/env python3
"""Decompression speed of a gzip layer with zlib and the faster libraries lazysnap could use.

Streams the blob in 1 MiB pieces, as ``lazysnap pull`` does, through each library's
``decompressobj`` (rapidgzip: its file reader, which decompresses in parallel threads), and
prints MB/s of decompressed output and the ratio against zlib measured in the same run.
Rounds interleave the libraries, so a noisy machine slows them all alike.

    python benchmarks/decompress.py [BLOB] [--rounds 3]

BLOB defaults to the startup benchmark's gzip layer (benchmarks/startup.py caches it).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

CACHE = Path("/var/cache/lazysnap-bench/layouts")
PIECE = 1024 * 1024


def default_blob() -> Path:
    blobs = sorted(CACHE.glob("gzip-*/blobs/sha256/*"), key=lambda p: p.stat().st_size)
    if not blobs:
        raise SystemExit(f"no gzip layer under {CACHE}: run benchmarks/startup.py once")
    return blobs[-1]


def streaming(module: str) -> Callable[[bytes], int] | None:
    try:
        lib = importlib.import_module(module)
    except ImportError:
        return None

    def run(blob: bytes) -> int:
        out = 0
        d = lib.decompressobj(31)
        view = memoryview(blob)
        for start in range(0, len(blob), PIECE):
            out += len(d.decompress(view[start : start + PIECE]))
        return out + len(d.flush())

    return run


def rapidgzip_reader() -> Callable[[bytes], int] | None:
    try:
        rapidgzip = importlib.import_module("rapidgzip")
    except ImportError:
        return None

    def run(blob: bytes) -> int:
        out = 0
        with rapidgzip.open(io.BytesIO(blob), parallelization=2) as f:
            while piece := f.read(PIECE):
                out += len(piece)
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("blob", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    blob_path = args.blob or default_blob()
    blob = blob_path.read_bytes()
    candidates: dict[str, Callable[[bytes], int] | None] = {
        "zlib": streaming("zlib"),
        "isal": streaming("isal.isal_zlib"),
        "zlib-ng": streaming("zlib_ng.zlib_ng"),
        "rapidgzip": rapidgzip_reader(),
    }
    runners = {name: run for name, run in candidates.items() if run is not None}
    expected = len(zlib.decompress(blob, 31))
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            produced = run(blob)
            seconds[name].append(time.perf_counter() - started)
            if produced != expected:
                raise SystemExit(f"{name} produced {produced} bytes, zlib {expected}")
    print(f"blob {blob_path.name[:12]}: {len(blob) / 1e6:.1f} MB -> {expected / 1e6:.1f} MB, "
          f"{args.rounds} rounds, median")
    base = statistics.median(seconds["zlib"])
    for name in runners:
        median = statistics.median(seconds[name])
        raw = " ".join(f"{s:.2f}" for s in seconds[name])
        print(f"{name:10} {expected / 1e6 / median:7.0f} MB/s  x{base / median:4.2f} vs zlib  "
              f"(s: {raw})")
    missing = sorted(set(candidates) - set(runners))
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
