#!/usr/bin/env python3
"""``lazysnap pull --snapshotter-address`` vs stargz-snapshotter's ``ctr-remote images rpull``
of the same kind of eStargz image on loopback, interleaved, and where lazysnap's pull spends its
time (issue 13, the pull path).

Every arm has its own containerd and its own snapshotter daemon, started once before the first
run; run ``i`` of every arm pulls scale image ``i`` (the scale benchmark's one-layer eStargz
images, cached under /var/cache/lazysnap-bench/scale/, distinct layers), so that no pull finds
anything local; with ``--together N`` each run pulls N of them at the same moment. The order of
the arms rotates from run to run. Both snapshotters run without their background fetch, which
would otherwise download earlier runs' layers during later pulls.
Arms:

* ``stargz``: ``ctr-remote images rpull --plain-http`` into containerd-stargz-grpc (built once
  by benchmarks/startup.py);
* ``lazysnap``: this tree's ``lazysnap pull --snapshotter-address`` and daemon;
* ``base`` (with ``--base-tree DIR``): the same command and daemon run from the source tree
  ``DIR`` (e.g. ``git archive main | tar -x -C DIR``), so a change and its baseline are
  measured in the same run.

Printed: per arm the median, min and max wall time of the pull command and the ratio of the
medians to stargz's; per lazysnap arm the medians over all its pulls of the CLI's own phases
(Resolve sent, answer logged, lease deleted, exit; the tail from the lease delete to the exit)
and, when pulls run one at a time, of the command's CPU seconds; then, for the last lazysnap
pull of each lazysnap arm, its phases from the pull's and the daemon's debug logs (seconds
since the command started).

    sudo .venv/bin/python benchmarks/pull_phases.py --runs 8
    sudo .venv/bin/python benchmarks/pull_phases.py --runs 8 --base-tree /tmp/lazysnap-main
    sudo .venv/bin/python benchmarks/pull_phases.py --runs 4 --together 5   # 5 pulls at once
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import REPOSITORY, ensure_images, scratch
from startup import (
    REPO,
    compile_lazysnap,
    ensure_stargz_grpc,
    log,
    running_stargz,
    unmount_under,
)

from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, run_containerd
from tests.support.daemon import running_daemon
from tests.support.docker_registry import run_registry

STEP_TIMEOUT = 120.0
PYTHON = REPO / ".venv" / "bin" / "python"
# "2026-12-03 22:59:01,123 DEBUG logger message": setup_logging's text format.
TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) (\S+) (.*)$")


@dataclass
class Arm:
    name: str
    containerd: RunningContainerd
    daemon_address: Path | None = None
    daemon_log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds per pull (--together 1 only)
    cli_phases: list[dict[str, float]] = field(default_factory=list)
    last_stderr: str = ""
    last_started: float = 0.0  # wall clock (time.time) of the last pull's start


def _command(arm: Arm, reference: str) -> list[str]:
    if arm.name == "stargz":
        return ["ctr-remote", "--address", str(arm.containerd.address), "--namespace",
                arm.containerd.namespace, "images", "rpull", "--plain-http", reference]
    return [str(PYTHON), "-m", "snapshotter.cli", "pull", reference,
            "--snapshotter", "lazysnap", "--address", str(arm.containerd.address),
            "--namespace", arm.containerd.namespace, "--snapshotter-address",
            str(arm.daemon_address), "--log-level", "debug"]


def pull_once(arm: Arm, reference: str, profile: Path | None) -> tuple[float, float, str, float]:
    """The pull's wall time, its start on the wall clock, its stderr and the CPU seconds of the
    children reaped meanwhile (the pull's own when it is the only one running)."""
    command = _command(arm, reference)
    if profile is not None and arm.name != "stargz":
        # py-spy's collapsed stacks: one line per stack with its sample count.
        command = ["py-spy", "record", "--rate", "1000", "--format", "raw", "--output",
                   str(profile), "--", *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall_started = time.time()
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT, check=False,
                          env={**os.environ, **arm.env})
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{arm.name} pull of {reference} failed: {done.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return elapsed, wall_started, done.stderr, cpu


def pull_together(arm: Arm, references: Sequence[str],
                  profiles: Sequence[Path | None]) -> list[float]:
    """Pull ``references`` at the same moment; each pull's wall time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(references)) as pool:
        done = list(pool.map(lambda r, p: pull_once(arm, r, p), references, profiles))
    arm.seconds += [seconds for seconds, _, _, _ in done]
    if len(references) == 1:
        arm.cpu.append(done[0][3])
    if arm.name != "stargz":
        arm.cli_phases += [cli_phases(stderr, started, seconds)
                           for seconds, started, stderr, _ in done]
    _, arm.last_started, arm.last_stderr, _ = done[-1]
    return [seconds for seconds, _, _, _ in done]


def _check_tree(tree: Path, env: dict[str, str]) -> None:
    """The arm's processes import lazysnap from ``tree``, not from another checkout."""
    where = subprocess.run(
        [str(PYTHON), "-c", "import snapshotter; print(snapshotter.__file__)"],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"an arm meant to run {tree} would import {where}")


# -- phases ------------------------------------------------------------------------------------

def _text_events(text: str, origin: float, who: str) -> list[tuple[float, str]]:
    events = []
    for line in text.splitlines():
        m = TEXT_LINE.match(line)
        if not m:
            continue
        seconds = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        stamp = seconds + int(m.group(2)) / 1000
        events.append((stamp - origin, f"{who} {m.group(4).rsplit('.', 1)[-1]}: "
                                       f"{m.group(5)[:110]}"))
    return events


def _json_events(text: str, origin: float, who: str) -> list[tuple[float, str]]:
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            stamp = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=UTC).timestamp()
            events.append((stamp - origin, f"{who} {entry['logger'].rsplit('.', 1)[-1]}: "
                                           f"{entry['msg'][:110]}"))
    return events


# The CLI's log lines that mark its phases (its debug log), by the phase's name.
CLI_MARKS = {"sent": "resolve through the daemon", "answer": "resolved by the daemon",
             "deleted": "lease-deleted"}


def cli_phases(stderr: str, origin: float, seconds: float) -> dict[str, float]:
    """A pull's phases in seconds since it started: CLI_MARKS' lines, its exit, and the tail
    from the lease delete to the exit."""
    found = {"exit": seconds}
    for at, what in _text_events(stderr, origin, "cli"):
        for name, mark in CLI_MARKS.items():
            if mark in what:
                found[name] = at
    if "deleted" in found:
        found["tail"] = seconds - found["deleted"]
    return found


def phases(arm: Arm) -> str:
    """The last pull's log lines and the daemon's from the same moment on, as seconds since the
    command started, at millisecond resolution (the pull logs local time, the daemon UTC)."""
    origin = arm.last_started
    events = _text_events(arm.last_stderr, origin, "cli")
    if arm.daemon_log is not None and arm.daemon_log.exists():
        daemon = [e for e in _json_events(arm.daemon_log.read_text(errors="replace"),
                                          origin, "daemon") if e[0] >= -0.001]
        events += daemon
    events.sort(key=lambda e: e[0])
    rows = [f"  {at:7.3f}  {what}" for at, what in events]
    rows.append(f"  {arm.seconds[-1]:7.3f}  (command exited)")
    return "\n".join(rows)


# -- the run -----------------------------------------------------------------------------------

def render(arms: Sequence[Arm]) -> str:
    by_name = {a.name: a for a in arms}
    stargz = by_name.get("stargz")
    rows = [f"{'arm':10} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'vs stargz':>10}"]
    for arm in arms:
        median = statistics.median(arm.seconds)
        ratio = (f"{median / statistics.median(stargz.seconds):.2f}x"
                 if stargz and stargz.seconds else "-")
        rows.append(f"{arm.name:10} {len(arm.seconds):>4} {median:9.3f} "
                    f"{min(arm.seconds):7.3f} {max(arm.seconds):7.3f} {ratio:>10}")
        rows.append("  runs: " + " ".join(f"{s:.3f}" for s in arm.seconds))
        medians = [f"{name} {statistics.median(p[name] for p in arm.cli_phases):.3f}"
                   for name in ("sent", "answer", "deleted", "exit", "tail")
                   if arm.cli_phases and all(name in p for p in arm.cli_phases)]
        if arm.cpu:
            medians.append(f"CPU {statistics.median(arm.cpu):.3f}")
        if medians:
            rows.append("  medians (s): " + ", ".join(medians))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="runs per arm")
    parser.add_argument("--together", type=int, default=1, metavar="N",
                        help="pulls started at once in each run (runs x N at most 20)")
    parser.add_argument("--arms", default="stargz,lazysnap")
    parser.add_argument("--base-tree", type=Path, metavar="DIR",
                        help="add the arm `base`: lazysnap run from this source tree")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each lazysnap pull with py-spy (pip install py-spy) as "
                        "DIR/ARM-RUN.txt, collapsed stacks; its start-up adds to the times")
    parser.add_argument("--phases", action="store_true",
                        help="print the last lazysnap pull's log timeline per lazysnap arm")
    args = parser.parse_args(argv)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if args.base_tree:
        names.append("base")
    pulls = args.runs * args.together
    if args.runs < 1 or args.together < 1 or pulls > 20:
        raise SystemExit("--runs and --together: at least 1, and runs x together at most 20")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    layouts = ensure_images(pulls)
    stargz_grpc = ensure_stargz_grpc() if "stargz" in names else None
    with scratch("lzp") as top, run_registry(top / "registry") as registry, \
            contextlib.ExitStack() as stack:
        references = [f"{registry.host}/{REPOSITORY}{n}:latest" for n in range(pulls)]
        for layout, reference in zip(layouts, references, strict=True):
            oci.push_layout(layout, "latest", reference)
        arms: list[Arm] = []
        for name in names:
            workdir = top / name[:2]
            stack.callback(unmount_under, workdir)
            if name == "stargz":
                assert stargz_grpc is not None
                sock = stack.enter_context(running_stargz(
                    workdir / "s", stargz_grpc, registry.host,
                    settings="no_background_fetch = true\n"))
                containerd = stack.enter_context(run_containerd(
                    workdir / "c", workdir / "none.sock", extra_proxy_plugins={"stargz": sock}))
                arms.append(Arm(name, containerd))
                continue
            tree = args.base_tree.resolve() if name == "base" else REPO
            # PYTHONSAFEPATH: `python -m` would put the working directory first on sys.path,
            # before PYTHONPATH, so started from a checkout, the base arm ran that checkout's
            # CLI and daemon instead of the base tree's.
            env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
            compile_lazysnap(tree)
            _check_tree(tree, env)
            config = top / "lazysnap.toml"
            config.write_text("[lazy]\nbackground_fetch = false\n")
            daemon = stack.enter_context(running_daemon(
                workdir / "d", env=env, extra_args=["--config", str(config)]))
            containerd = stack.enter_context(run_containerd(workdir / "c", daemon.address))
            arms.append(Arm(name, containerd, daemon.address, daemon.log_path, env))
        for run in range(args.runs):
            order = arms[run % len(arms):] + arms[:run % len(arms)]
            numbers = range(run * args.together, (run + 1) * args.together)
            for arm in order:
                profiles = [args.profile / f"{arm.name}-{n + 1}.txt" if args.profile else None
                            for n in numbers]
                seconds = pull_together(arm, [references[n] for n in numbers], profiles)
                log(f"run {run + 1}/{args.runs} {arm.name}: "
                    + " ".join(f"{s:.3f}" for s in seconds) + " s")
        print(render(arms), flush=True)
        if args.phases:
            for arm in arms:
                if arm.daemon_log is not None:
                    print(f"\n{arm.name}: the last pull's timeline", flush=True)
                    print(phases(arm), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
