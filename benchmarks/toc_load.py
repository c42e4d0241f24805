"""CPU time of indexing an eStargz TOC (inflate, digest, parse, build), one tree against another.

Run (root not needed):
    .venv/bin/python benchmarks/toc_load.py [--base-tree DIR] [--rounds 8] [--repeat 3]

Layers: ``fuse_read.py``'s 50,500-entry tree (built here with this tree's writer) and, when
``scale.py`` has cached its images under /var/cache/lazysnap-bench/scale, the scale image's
layer (8,221 entries, the one ``pull_phases.py`` pulls). Each measurement is a child process
that imports the tree under test and times ``index_from_toc`` on the layer's TOC ``--repeat``
times (CPU time of the process, best of the repeats); the arms alternate round by round so
both see the same load. ``--base-tree DIR`` is another source tree (``git archive main | tar -x
-C DIR``), run with this tree's interpreter. Printed: per layer and arm the median and minimum
of the CPU seconds and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SCALE = Path("/var/cache/lazysnap-bench/scale")

CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from fusefs.formats.footer import parse_footer
from fusefs.formats.layer import index_from_toc
blob = open(sys.argv[2], "rb").read()
location = parse_footer(blob[-512 * 1024:], len(blob))
toc = blob[location.toc_offset : location.toc_offset + location.toc_length]
best = None
for _ in range(int(sys.argv[3])):
    start = time.process_time()
    index = index_from_toc(location, toc)
    spent = time.process_time() - start
    best = spent if best is None else min(best, spent)
print(index.entry_count, best)
"""


def scale_blob() -> Path | None:
    layouts = sorted(SCALE.glob("estargz-0-*"))
    if not layouts:
        return None
    layout = layouts[0]
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    return blobs / manifest["layers"][-1]["digest"][7:]


def measure(tree: Path, blob: Path, repeat: int) -> tuple[int, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(blob), str(repeat)],
        capture_output=True, text=True, check=True, timeout=600,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    entries, seconds = done.stdout.split()
    return int(entries), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-tree", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=50_000)
    args = parser.parse_args()
    from fuse_read import make_estargz, tree_tar  # noqa: PLC0415 (needs the path set above)

    arms = {"this tree": HERE.parent}
    if args.base_tree:
        arms["base"] = args.base_tree.resolve()
    with tempfile.TemporaryDirectory(prefix="toc-load.") as work:
        layers = {}
        tree = Path(work) / "tree.esgz"
        make_estargz(tree_tar(args.files), tree)
        layers["fuse_read tree"] = tree
        scale = scale_blob()
        if scale is not None:
            layers["scale image"] = scale
        print(f"load: {os.getloadavg()[0]:.1f}")
        times: dict[tuple[str, str], list[float]] = {}
        entries: dict[str, int] = {}
        names = list(arms)
        for round_number in range(args.rounds):
            order = names if round_number % 2 == 0 else names[::-1]
            for layer, blob in layers.items():
                for arm in order:
                    count, seconds = measure(arms[arm], blob, args.repeat)
                    entries[layer] = count
                    times.setdefault((layer, arm), []).append(seconds)
        print(f"load: {os.getloadavg()[0]:.1f}")
        print(f"{'layer':<16} {'entries':>8} {'arm':<10} {'median s':>9} {'min s':>7} {'ratio':>6}")
        for layer in layers:
            first = statistics.median(times[(layer, names[-1])])
            for arm in names:
                values = times[(layer, arm)]
                median = statistics.median(values)
                print(
                    f"{layer:<16} {entries[layer]:>8} {arm:<10} {median:>9.3f} "
                    f"{min(values):>7.3f} {median / first:>6.2f}"
                )


if __name__ == "__main__":
    main()
