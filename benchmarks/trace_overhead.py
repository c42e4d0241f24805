"""What tracing costs on the read path: reads answered from memory, tracing off vs recording.

    .venv/bin/python benchmarks/trace_overhead.py [--reads 20000] [--rounds 5]

Reads served from the hot chunk cache are the worst case: no I/O hides the hook. The arms run
interleaved in each round; the table gives the median microseconds per read. With a recording
open, the reads after a file's first are not first reads; those cost the per-recording check.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusefs.trace import TRACE  # noqa: E402
from tests.fusefs.test_handlers import operations  # noqa: E402


async def _measure(reads: int, rounds: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"off": [], "recording": []}
    with tempfile.TemporaryDirectory() as tmp:
        async with operations(Path(tmp)) as (ops, inodes, _, _):
            bin_dir = ops.lookup(inodes.inode(1, 0), b"bin")
            tool = ops.lookup(bin_dir.ino, b"tool").ino
            await ops.read(tool, 0, 4)  # the chunk is hot from here on
            for _ in range(rounds):
                for arm, times in timings.items():
                    recording = TRACE.start() if arm == "recording" else None
                    try:
                        started = time.perf_counter()
                        for _ in range(reads):
                            await ops.read(tool, 0, 4)
                        times.append((time.perf_counter() - started) / reads * 1e6)
                    finally:
                        if recording is not None:
                            TRACE.stop(recording)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    timings = trio.run(_measure, args.reads, args.rounds)
    off = statistics.median(timings["off"])
    on = statistics.median(timings["recording"])
    check = timeit.timeit("TRACE.active", globals={"TRACE": TRACE}, number=1_000_000) * 1e3
    print(f"tracing off:   {off:7.2f} us/read  (rounds: {[round(t, 2) for t in timings['off']]})")
    print(f"recording:     {on:7.2f} us/read  ({on / off:.3f}x; rounds: "
          f"{[round(t, 2) for t in timings['recording']]})")
    print(f"the off check: {check:7.1f} ns (TRACE.active, the hook's whole cost when off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
