"""``lazysnap index`` on the startup benchmark's plain gzip image: build time and zTOC size.

Run (root not needed; Debian's docker-registry and skopeo are):
    .venv/bin/python benchmarks/index_build.py [--rounds 3] [--span-size 4MiB ...]

The image is the startup benchmark's ``gzip`` layout (debootstrap bookworm minbase with
python3, one layer), built and cached by ``benchmarks/startup.py`` under
/var/cache/lazysnap-bench/. It is pushed to a loopback registry, then indexed ``--rounds``
times per span size, each under its own tag so that every round indexes the original image.
Interleaved with each round, the baseline: one ``zlib`` pass inflating the whole blob, which
is the least any zTOC build must do. Printed per round: the download, the zTOC build and the
baseline in seconds, and the zTOC's size and spans.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapshotter.commands.index import parse_size
from tests.support.docker_registry import run_registry
from tests.support.oci_image import push_layout

CACHE = Path("/var/cache/lazysnap-bench/layouts")


def gzip_layout() -> Path:
    found = sorted(CACHE.glob("gzip-*"))
    if not found:
        sys.exit("no gzip layout: run benchmarks/startup.py once to build and cache it")
    return found[0]


def layer_blob(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    (layer,) = manifest["layers"]
    return blobs / layer["digest"][7:]


def inflate_once(blob: Path) -> float:
    started = time.perf_counter()
    inflater = zlib.decompressobj(wbits=31)
    with blob.open("rb") as source:
        while block := source.read(1 << 20):
            inflater.decompress(block)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--span-size", action="append", default=None)
    args = parser.parse_args()
    spans = args.span_size or ["4MiB", "1MiB"]
    layout = gzip_layout()
    blob = layer_blob(layout)
    print(f"image: {layout.name}, one layer of {blob.stat().st_size / 1e6:.1f} MB gzip")
    with tempfile.TemporaryDirectory(prefix="index-bench.") as work, \
            run_registry(Path(work) / "registry") as registry:
        reference = f"{registry.host}/bench/debian:gzip"
        push_layout(layout, "latest", reference)
        print("round span     download_s build_s  zlib_s  build/zlib ztoc_kB spans")
        for round_number in range(1, args.rounds + 1):
            for span in spans:
                baseline = inflate_once(blob)
                tag = f"soci-{round_number}-{parse_size(span)}"
                done = subprocess.run(
                    [sys.executable, "-m", "snapshotter.cli", "index", reference, "--json",
                     "--span-size", span, "--tag", tag],
                    capture_output=True, text=True, check=True, timeout=900,
                )
                (layer,) = json.loads(done.stdout)["layers"]
                ztoc = layer["ztoc"]
                print(f"{round_number:5d} {span:8s} {layer['downloadSeconds']:10.2f} "
                      f"{layer['buildSeconds']:7.2f} {baseline:7.2f} "
                      f"{layer['buildSeconds'] / baseline:10.2f} {ztoc['size'] / 1e3:7.1f} "
                      f"{ztoc['spans']:5d}", flush=True)


if __name__ == "__main__":
    main()
