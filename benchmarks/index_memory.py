"""Memory and time to attach a 100k-entry layer index, against json.loads of the same TOC.

Run: .venv/bin/python benchmarks/index_memory.py [--entries 100000]

Each measurement runs in a fresh subprocess so RSS numbers do not mix. Printed:
* index: load_layer_index over an in-memory eStargz blob; RSS growth with the index alive
  (after the JSON and build temporaries are gone), the peak during the load, and the time;
* json baseline: json.loads of the same TOC JSON kept alive (what a naive reader would hold).
Target: index RSS growth <= 60 MB for 100k entries.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from fusefs.formats import CompactLayerIndex, load_layer_index
from fusefs.formats.footer import build_estargz_footer
from fusefs.formats.heap import release_free_heap

PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_toc(entries: int) -> tuple[bytes, int]:
    """A TOC shaped like a real distro layer: nested dirs, files with digests, some symlinks,
    hardlinks and xattrs. Returns the JSON and the payload area size it refers to."""
    items: list[dict[str, object]] = [{"name": "./", "type": "dir", "mode": 0o755}]
    dirs = max(1, entries // 50)
    for d in range(dirs):
        items.append(
            {"name": f"usr/share/pkg{d // 40:03d}/dir{d:05d}/", "type": "dir", "mode": 0o755}
        )
    offset = 512
    i = 0
    while len(items) < entries:
        d = i % dirs
        name = f"usr/share/pkg{d // 40:03d}/dir{d:05d}/file-{i:06d}.py"
        kind = i % 20
        if kind == 0:
            items.append({"name": name, "type": "symlink", "linkName": "../target/x.py"})
        elif kind == 1 and i > 20:
            prev = i - 19
            pd = prev % dirs
            target = f"usr/share/pkg{pd // 40:03d}/dir{pd:05d}/file-{prev:06d}.py"
            items.append({"name": name, "type": "hardlink", "linkName": target})
        else:
            digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
            entry: dict[str, object] = {
                "name": name,
                "type": "reg",
                "size": 1000 + i % 5000,
                "modtime": "2024-05-01T12:00:00Z",
                "mode": 0o644,
                "uid": 0,
                "gid": 0,
                "digest": digest,
                "offset": offset,
                "chunkDigest": digest,
            }
            if kind == 2:
                entry["xattrs"] = {"user.note": "aGVsbG8="}
            items.append(entry)
            offset += 700
        i += 1
    document = {"version": 1, "entries": items}
    return json.dumps(document, separators=(",", ":")).encode(), offset + 512


def build_blob(toc: bytes, payload_size: int) -> bytes:
    header = tarfile.TarInfo("stargz.index.json")
    header.size = len(toc)
    body = header.tobuf(tarfile.USTAR_FORMAT) + toc + bytes(-len(toc) % 512) + bytes(1024)
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
    member = deflate.compress(body) + deflate.flush()
    return bytes(payload_size) + member + build_estargz_footer(payload_size)


def measure_index(entries: int) -> dict[str, float]:
    toc, payload = synthetic_toc(entries)
    blob = build_blob(toc, payload)
    del toc

    class Blob:
        size = len(blob)
        digest = "sha256:bench"

        async def read_at(self, offset: int, length: int) -> bytes:
            return blob[offset : offset + length]

    gc.collect()
    release_free_heap()  # start both measurements from a trimmed heap
    before = rss_bytes()
    started = time.perf_counter()
    cpu_started = time.process_time()
    index = trio.run(load_layer_index, Blob())
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    gc.collect()
    release_free_heap()
    after = rss_bytes()
    assert isinstance(index, CompactLayerIndex)
    started = time.perf_counter()
    for entry in range(0, index.entry_count, 7):
        index.attr(entry)
    lookups = time.perf_counter() - started
    return {
        "entries": index.entry_count,
        "rss_delta_mb": (after - before) / 1e6,
        "peak_mb": peak_rss_bytes() / 1e6,
        "base_mb": before / 1e6,
        "seconds": elapsed,
        "cpu": cpu,
        "arrays_mb": index.memory_bytes() / 1e6,
        "attr_us": lookups / len(range(0, index.entry_count, 7)) * 1e6,
    }


def measure_json(entries: int) -> dict[str, float]:
    toc, _ = synthetic_toc(entries)
    gc.collect()
    release_free_heap()  # start both measurements from a trimmed heap
    before = rss_bytes()
    started = time.perf_counter()
    cpu_started = time.process_time()
    document = json.loads(toc)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    gc.collect()
    release_free_heap()
    after = rss_bytes()
    assert len(document["entries"]) == entries
    return {
        "rss_delta_mb": (after - before) / 1e6,
        "peak_mb": peak_rss_bytes() / 1e6,
        "base_mb": before / 1e6,
        "seconds": elapsed,
        "cpu": cpu,
        "toc_mb": len(toc) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--mode", choices=["index", "json"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        measure = measure_index if args.mode == "index" else measure_json
        print(json.dumps(measure(args.entries)))
        return
    results = {}
    for mode in ("json", "index"):
        run = subprocess.run(
            [sys.executable, __file__, "--entries", str(args.entries), "--mode", mode],
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(run.stdout)
    index, baseline = results["index"], results["json"]
    print(f"TOC entries: {args.entries}  TOC JSON: {baseline['toc_mb']:.1f} MB")
    print(f"{'':28}{'RSS growth':>12}{'peak RSS':>12}{'wall':>10}{'cpu':>10}")
    for label, row in (("json.loads (baseline)", baseline), ("load_layer_index", index)):
        print(
            f"{label:28}{row['rss_delta_mb']:>9.1f} MB{row['peak_mb']:>9.1f} MB"
            f"{row['seconds']:>9.2f}s{row['cpu']:>9.2f}s"
        )
    print(f"index arrays and blobs: {index['arrays_mb']:.1f} MB; attr(): {index['attr_us']:.2f} us")
    print(
        f"ratio index/json RSS growth: {index['rss_delta_mb'] / baseline['rss_delta_mb']:.2f}; "
        f"load cpu ratio: {index['cpu'] / baseline['cpu']:.1f}x json.loads"
    )
    target = "OK" if index["rss_delta_mb"] <= 60 else "OVER"
    print(f"target <= 60 MB RSS growth for {args.entries} entries: {target}")


if __name__ == "__main__":
    main()
