#!/usr/bin/env python3
"""A full pull of the startup benchmark's plain gzip image: ``lazysnap pull`` with parallel pull
against containerd's own ``ctr image pull``, in the same run (issue 14, item 3).

Arms, each on a fresh containerd and lazysnap daemon, all through one netproxy per link:

* ``ctr``: ``ctr image pull --plain-http`` into containerd's overlayfs snapshotter (it downloads
  every blob, then unpacks them with containerd's diff service);
* ``parallel``: ``lazysnap pull --parallel --snapshotter lazysnap --snapshotter-address ...``
  (ranged downloads over several connections, unpacked while they arrive);
* ``serial`` (optional): the same with ``--no-parallel``, lazysnap's previous path.

Rounds interleave the arms (their order rotates every round), so that the noise of a shared
machine falls on all of them. Every run's trees stay until the end of the whole benchmark, under a
scratch directory marked ``chattr +T`` (see ``scratch_directory``): on an ext4 with no journal,
creating files right after deleting a large tree is slow, which would make the run after each
deletion pay for it. Reported per arm: wall time of the pull command, CPU seconds of
the pull command, containerd and the lazysnap daemon together, and the peak resident memory of
each (the command's from wait4, the daemons' VmHWM). Raw values are printed with the medians
and the ratio against ``ctr``.

    .venv/bin/python benchmarks/full_pull.py                 # loopback + 100 Mbit/s, 20 ms
    .venv/bin/python benchmarks/full_pull.py --rounds 5 --arms ctr,parallel,serial

Needs root, containerd 1.6 + ctr + runc, docker-registry, skopeo, GNU time (/usr/bin/time,
for the command's peak memory), and the cached image of
benchmarks/startup.py (built there once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from netproxy import LinkProxy  # noqa: E402
from startup import (  # noqa: E402
    LAZYSNAP,
    ensure_layouts,
    ensure_rootfs,
    unmount_under,
)

from tests.support import oci_image as oci  # noqa: E402
from tests.support.containerd import RunningContainerd, run_containerd  # noqa: E402
from tests.support.daemon import running_daemon  # noqa: E402
from tests.support.docker_registry import run_registry  # noqa: E402

ARMS = ("ctr", "parallel", "serial")
REPOSITORY = "bench/debian"
TAG = "gzip"
# Issue 14: the parallel pull's time as a fraction of ctr's.
TARGETS = {"loopback": 0.6, "limited": 0.75}
PULL_TIMEOUT = 900.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    link: str
    arm: str
    round: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the command + containerd + the lazysnap daemon
    command_rss_mb: float = 0.0
    containerd_rss_mb: float = 0.0
    daemon_rss_mb: float = 0.0
    summary: str = ""
    error: str = ""


def scratch_directory(parent: Path) -> Path:
    """The benchmark's top directory, marked as a top of a directory hierarchy (``chattr +T``).

    On ext4 with no journal (this VM's root file system), allocating an inode skips every free
    inode of its block group that was deleted in the last 1-2.5 minutes, reading its inode
    table block for each (``recently_deleted``): deleting one run's 10,000-entry trees and then
    unpacking the next run's into the same block groups cost about a third to a half of the
    pull's CPU, in whichever arm came next. So no run's tree is deleted before the end, and
    ``+T`` makes ext4's Orlov allocator spread the runs' directories over block groups, as it
    does below a file system's root, rather than keeping them near the parent's group.
    """
    top = Path(tempfile.mkdtemp(prefix="lzfp", dir=parent))
    marked = subprocess.run(["chattr", "+T", str(top)], check=False, capture_output=True,
                            text=True)
    if marked.returncode != 0:  # not ext2/3/4, or no chattr: measured without the hint
        print(f"chattr +T {top}: {marked.stderr.strip()}", file=sys.stderr)
    return top


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime: fields 14-17 of stat(5), 12-15 after the ")".
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _command(arm: str, reference: str, containerd: RunningContainerd, hosts_dir: Path,
             daemon_address: Path) -> list[str]:
    if arm == "ctr":
        return ["ctr", "--address", str(containerd.address), "--namespace",
                containerd.namespace, "image", "pull", "--plain-http", reference]
    return [str(LAZYSNAP), "pull", reference, "--snapshotter", "lazysnap",
            "--address", str(containerd.address), "--namespace", containerd.namespace,
            "--hosts-dir", str(hosts_dir), "--snapshotter-address", str(daemon_address),
            "--parallel" if arm == "parallel" else "--no-parallel", "--quiet"]


def measure(link: str, arm: str, number: int, reference: str, workdir: Path) -> Sample:
    sample = Sample(link, arm, number)
    workdir.mkdir(parents=True)
    hosts_dir = workdir / "hosts"
    hosts_dir.mkdir()
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(
            running_daemon(workdir / "d", extra_args=["--log-level", "info"]))
        containerd = stack.enter_context(run_containerd(workdir / "c", daemon.address))
        assert daemon.process is not None
        pids = [containerd.process.pid, daemon.process.pid]
        cpu_before = sum(_cpu_seconds(pid) for pid in pids)
        command = _command(arm, reference, containerd, hosts_dir, daemon.address)
        out_path, err_path = workdir / "pull.out", workdir / "pull.err"
        rss_path = workdir / "pull.rss"
        # The command's peak memory through GNU time: a child forked from this (large) Python
        # process would report this process's peak as its own (Linux keeps the high-water
        # mark of the forked copy across exec).
        command = ["/usr/bin/time", "-f", "%M", "-o", str(rss_path), *command]
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.monotonic()
            process = subprocess.Popen(command, stdout=out, stderr=err)
            timer = threading.Timer(PULL_TIMEOUT, process.kill)
            timer.start()
            # wait4, not wait: the command's own CPU time and peak memory come with it.
            _, status, usage = os.wait4(process.pid, 0)
            sample.seconds = time.monotonic() - started
            timer.cancel()
            process.returncode = os.waitstatus_to_exitcode(status)
        sample.cpu_seconds = (usage.ru_utime + usage.ru_stime
                              + sum(_cpu_seconds(pid) for pid in pids) - cpu_before)
        sample.command_rss_mb = int(rss_path.read_text().split()[-1]) / 1024
        sample.containerd_rss_mb = _peak_rss_mb(containerd.process.pid)
        sample.daemon_rss_mb = _peak_rss_mb(daemon.process.pid)
        if process.returncode != 0:
            sample.error = err_path.read_text(errors="replace").strip()[-1500:]
            return sample
        sample.summary = out_path.read_text(errors="replace").strip()[-200:]
        # The image must be complete: the top snapshot and the blob in the content store.
        check = containerd.ctr("images", "check", check=False).stdout
        if "complete" not in check:
            sample.error = f"ctr images check: {check.strip()}"
    return sample


def render(link: str, samples: list[Sample], arms: list[str]) -> str:
    rows = [f"## {link}", "",
            "| arm | pull s (median) | x ctr | CPU s | command / containerd / daemon peak "
            "RSS MB | raw pull s |",
            "|---|---|---|---|---|---|"]
    ok = {arm: [s for s in samples if s.arm == arm and not s.error] for arm in arms}
    base = statistics.median(s.seconds for s in ok["ctr"]) if ok.get("ctr") else float("nan")
    for arm in arms:
        good = ok[arm]
        if not good:
            rows.append(f"| {arm} | failed | | | | |")
            continue
        median = statistics.median(s.seconds for s in good)
        cpu = statistics.median(s.cpu_seconds for s in good)
        rss = (f"{max(s.command_rss_mb for s in good):.0f} / "
               f"{max(s.containerd_rss_mb for s in good):.0f} / "
               f"{max(s.daemon_rss_mb for s in good):.0f}")
        raw = " ".join(f"{s.seconds:.2f}" for s in good)
        rows.append(f"| {arm} | {median:.2f} | {median / base:.2f} | {cpu:.1f} | {rss} | {raw} |")
    # Ratios of the same round: the noise of one moment hits both arms of it.
    if "parallel" in ok and ok.get("ctr"):
        by_round = {s.round: s.seconds for s in ok["ctr"]}
        paired = [s.seconds / by_round[s.round] for s in ok["parallel"] if s.round in by_round]
        if paired:
            rows += ["", f"parallel / ctr per round: {' '.join(f'{r:.2f}' for r in paired)}; "
                     f"median {statistics.median(paired):.2f} (target ≤ {TARGETS[link]})"]
    failed = [s for s in samples if s.error]
    rows += [f"- {s.arm} round {s.round} failed: {s.error[-300:]}" for s in failed]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default="ctr,parallel")
    parser.add_argument("--links", default="loopback,limited")
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--scratch-dir", type=Path, default=Path("/tmp"),
                        help="where the runs' containerd and lazysnap roots go (a file system "
                        "of its own keeps other work's deletions out of the measurement)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if "ctr" not in arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"--arms: a list of {', '.join(ARMS)} that includes ctr")
    links = {"loopback": (0.0, 0.0), "limited": (args.mbit, args.rtt_ms)}
    chosen = [name for name in args.links.split(",") if name]
    image = ensure_layouts(ensure_rootfs(), None, ["overlayfs"])["overlayfs"]
    top = scratch_directory(args.scratch_dir)
    samples: list[Sample] = []
    tables: list[str] = []
    try:
        with run_registry(top / "registry") as registry:
            oci.push_layout(image.layout, "latest", f"{registry.host}/{REPOSITORY}:{TAG}")
            host, port = registry.host.rsplit(":", 1)
            number = 0
            for link in chosen:
                mbit, rtt = links[link]
                with LinkProxy((host, int(port)), mbit=mbit, rtt_ms=rtt, lifetime=7200) as proxy:
                    reference = f"{proxy.address}/{REPOSITORY}:{TAG}"
                    link_samples: list[Sample] = []
                    for round_number in range(args.rounds):
                        order = arms[round_number % len(arms):] + arms[:round_number % len(arms)]
                        for arm in order:
                            number += 1
                            workdir = top / f"r{number}"
                            try:
                                sample = measure(link, arm, round_number, reference, workdir)
                            except Exception as exc:  # one broken run must not end the rest
                                sample = Sample(link, arm, round_number, error=repr(exc)[:1500])
                            finally:
                                # Deleted with the rest at the end (see scratch_directory).
                                unmount_under(workdir)
                            print(f"[{link}] round {round_number} {arm}: {sample.seconds:.2f} s "
                                  f"cpu {sample.cpu_seconds:.1f} s"
                                  f"{' ERROR ' + sample.error[-300:] if sample.error else ''}",
                                  file=sys.stderr, flush=True)
                            link_samples.append(sample)
                    samples += link_samples
                    table = render(link, link_samples, arms)
                    tables.append(table)
                    print(table + "\n", flush=True)
    finally:
        unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0 if all(not s.error for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
