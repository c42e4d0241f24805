"""Inflating a gzip span from a zTOC checkpoint: the three methods against plain zlib.

Run: .venv/bin/python benchmarks/ztoc_inflate.py [--mib 16] [--span-mib 1] [--rounds 3]

The data is real: a tar of the running Python's standard library and /bin/busybox (text,
bytecode and machine code), cut to ``--mib`` MiB, plus ``--random-mib`` MiB of random bytes
(which gzip keeps in stored blocks, as it does for already compressed files in real layers),
gzipped at level 6. A zTOC is built for
it, then every span is inflated from its checkpoint by each method. Printed per method:
uncompressed MB/s over all spans (best of ``--rounds``) and how many spans failed. The
baseline is one ``zlib`` pass over the whole blob (no checkpoints), measured in the same run.
Also printed: zTOC build time and size.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import sysconfig
import tarfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusefs.formats.errors import LayerFormatError
from fusefs.formats.ztoc import InflateMethod, build_ztoc, parse_ztoc

MiB = 1024 * 1024


def sample_tar(limit: int, random_bytes: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        noise = tarfile.TarInfo("random.bin")
        noise.size = random_bytes
        tar.addfile(noise, io.BytesIO(os.urandom(random_bytes)))
        sources = [Path("/bin/busybox"), *sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*"))]
        for path in sources:
            if buffer.tell() >= limit:
                break
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path).lstrip("/"), recursive=False)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--random-mib", type=float, default=1.0)
    parser.add_argument("--span-mib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tar = sample_tar(args.mib * MiB, int(args.random_mib * MiB))
    blob = gzip.compress(tar, compresslevel=6, mtime=0)
    started = time.perf_counter()
    built = build_ztoc(io.BytesIO(blob), span_size=int(args.span_mib * MiB))
    build_seconds = time.perf_counter() - started
    layer = parse_ztoc(built.data, blob_size=len(blob), ztoc_digest=built.digest)
    spans = layer.spans
    print(
        f"data: {len(tar) / MiB:.1f} MiB tar, {len(blob) / MiB:.1f} MiB gzip, "
        f"{len(spans)} spans of >= {args.span_mib} MiB"
    )
    print(
        f"zTOC: built in {build_seconds:.2f} s ({len(tar) / MiB / build_seconds:.0f} MB/s), "
        f"{len(built.data)} bytes ({len(built.data) / len(blob) * 100:.1f}% of the blob)"
    )
    pieces = [blob[slice(*spans.compressed_range(i))] for i in range(len(spans))]
    best = min(_timed(lambda: zlib.decompress(blob, 31)) for _ in range(args.rounds))
    print(f"{'method':<22}{'MB/s':>8}{'failed spans':>14}")
    print(f"{'zlib, whole blob':<22}{len(tar) / MiB / best:>8.0f}{'-':>14}")
    for method in InflateMethod:
        failed = 0
        times = []
        for _ in range(args.rounds):
            failed = 0
            started = time.perf_counter()
            for span, piece in enumerate(pieces):
                try:
                    layer.inflate(span, piece, method)
                except LayerFormatError:
                    failed += 1
            times.append(time.perf_counter() - started)
        print(f"{method.value:<22}{len(tar) / MiB / min(times):>8.0f}{failed:>14}")


def _timed(action: object) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
