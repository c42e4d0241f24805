"""``lazysnap trace`` around a real lazy container start: ``lazysnap pull``, then ``ctr run``
inside ``lazysnap trace record``, checked against what the registry served, then plotted.

The image, the stack and the registry log reading are those of the lazy end-to-end test.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.integration import test_lazy_end_to_end as e2e
from tests.integration.test_lazy_end_to_end import (
    HELLO,
    ConvertedImage,
    _layer_bytes_served,
    _lazysnap,
    _pull,
)
from tests.support.containerd import RunningContainerd
from tests.support.daemon import Daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.marks import full_stack

# The end-to-end test's fixtures, shared: the image, converted once per module.
plain_image = e2e.plain_image
converted = e2e.converted
stack = e2e.stack

pytestmark = full_stack()


def _quiet_log(registry: RunningRegistry, quiet: float = 1.0, limit: float = 30.0) -> int:
    """The registry log's length once it stopped growing: the pull's own reads are over."""
    deadline = time.monotonic() + limit
    length = len(registry.log())
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = len(registry.log())
        if now == length:
            return length
        length = now
    return length


def test_trace_of_a_lazy_start_matches_the_registry_and_plots(
    stack: tuple[Daemon, RunningContainerd],
    docker_registry: RunningRegistry,
    converted: dict[str, ConvertedImage],
    tmp_path: Path,
) -> None:
    daemon, containerd = stack
    image = converted["estargz"]
    digests = [layer["digest"] for layer in image.layers]
    _pull(containerd, image.reference)
    log_start = _quiet_log(docker_registry)

    trace_path = tmp_path / "start.jsonl"
    ctr = ["ctr", "--address", str(containerd.address), "--namespace", containerd.namespace,
           "run", "--rm", "--snapshotter", "lazysnap", image.reference, "traced",
           "/bin/cat", "/etc/hello"]
    result = _lazysnap("trace", "record", "--address", str(daemon.address),
                       "--output", str(trace_path), "--", *ctr, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HELLO.decode()  # the command's output passes through
    served, requests = _layer_bytes_served(docker_registry.log()[log_start:], digests)

    records = [json.loads(line) for line in trace_path.read_text().splitlines()]
    assert records[0]["type"] == "start" and records[0]["command"] == ctr
    assert records[-1]["type"] == "end" and records[-1]["exit_code"] == 0
    assert records[-1]["dropped"] == 0
    reads = [r for r in records if r["type"] == "read"]
    ranges = [r for r in records if r["type"] == "range"]
    paths = {r["path"] for r in reads}
    assert {"bin/busybox", "etc/hello"} <= paths, sorted(paths)
    hello = next(r for r in reads if r["path"] == "etc/hello")
    assert hello["file_size"] == len(HELLO) and hello["offset"] == 0 and hello["wait"] >= 0
    assert all(r["digest"] in digests and not r.get("error") for r in reads)
    # Every byte the registry served for the layers during the start is in the trace, range by
    # range, and nothing else is.
    assert ranges and all(r["digest"] in digests and not r.get("error") for r in ranges)
    assert sum(r["bytes"] for r in ranges) == served > 0
    assert len(ranges) == requests
    assert {r["kind"] for r in ranges} == {"on-demand"}  # background fetch is off in `stack`
    for fetched in ranges:
        assert fetched["bytes"] == fetched["end"] - fetched["start"] > 0
    # A file's first read starts before the ranges it waited on finish.
    busybox = next(r for r in reads if r["path"] == "bin/busybox")
    assert any(r["time"] + r["duration"] <= busybox["time"] + busybox["wait"] + 0.001
               for r in ranges)

    png = tmp_path / "start.png"
    report = _lazysnap("trace", "report", str(trace_path), "--png", str(png))
    assert report.returncode == 0, report.stderr
    assert "files read" in report.stdout and "etc/hello" in report.stdout
    from matplotlib import image as mpimage  # noqa: PLC0415

    pixels = mpimage.imread(png)
    assert pixels.shape[:2] == (1500, 1500)
    assert pixels[:, :, :3].std() > 0.05  # not a blank canvas
    print(f"\ntrace: {len(reads)} first reads, {len(ranges)} ranges, {served} bytes; "
          f"registry: {requests} requests; python {sys.version_info[:2]}")
