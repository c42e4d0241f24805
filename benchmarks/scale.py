#!/usr/bin/env python3
"""Many images and containers started at once against one snapshotter daemon (issue 13).

``--images`` distinct eStargz images (the startup benchmark's Debian root file system, each with
one file of its own, so no two share a layer) are pulled at the same moment, and as soon as an
image's pull returns, ``--containers`` containers of it are started at once, each running the
``hello`` workload. Arms: ``lazysnap`` (``lazysnap pull`` + ``ctr run --snapshotter lazysnap``)
and ``stargz`` (stargz-snapshotter 0.12: ``ctr-remote images rpull`` + ``ctr run --snapshotter
stargz``), one after the other on fresh containerd, snapshotter and registry-proxy state.

Printed per arm: time to first output of every container from the common start (p50, p90,
p99, max), the failures, the snapshotter daemon's CPU seconds (user + system, from
``/proc/<pid>/stat`` at the end) and its peak RSS (``VmHWM``), and the bytes the registry link
carried; then lazysnap's values as a ratio of stargz-snapshotter's, measured in the same run.

    .venv/bin/python benchmarks/scale.py                         # 20 images x 5, loopback
    .venv/bin/python benchmarks/scale.py --mbit 100 --rtt-ms 20  # over a limited link
    .venv/bin/python benchmarks/scale.py --images 4 --containers 2 --arms lazysnap

Needs what benchmarks/startup.py needs (root, /dev/fuse, containerd, runc, docker-registry,
skopeo; ctr-remote and a containerd-stargz-grpc for the stargz arm). The images are converted
once and cached under /var/cache/lazysnap-bench/scale/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netproxy import LinkProxy
from startup import (
    CACHE,
    LAZYSNAP,
    REPO,
    compile_lazysnap,
    ensure_rootfs,
    ensure_stargz_grpc,
    log,
    running_stargz,
    unmount_under,
)

from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, run_containerd
from tests.support.daemon import running_daemon
from tests.support.docker_registry import run_registry

ARMS = ("lazysnap", "stargz")
WORKLOAD = ["python3", "-c", 'print("hello")']
REPOSITORY = "bench/scale"
# A pull or a container that has not finished by then counts as failed.
STEP_TIMEOUT = 900.0


# -- the images -------------------------------------------------------------------------------

def _with_own_file(base: bytes, number: int) -> bytes:
    """The root file system tar with one small file that makes its layer unique."""
    out = io.BytesIO(base)
    with tarfile.open(fileobj=out, mode="a") as tar:
        content = f"scale benchmark image {number}\n".encode()
        info = tarfile.TarInfo("etc/lazysnap-bench-image")
        info.size = len(content)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def ensure_images(count: int) -> list[Path]:
    """``count`` OCI layouts of distinct one-layer eStargz images, converted once and cached."""
    rootfs = ensure_rootfs()
    key = f"{rootfs.stat().st_size:x}-{int(rootfs.stat().st_mtime):x}"
    layouts = [CACHE / "scale" / f"estargz-{number}-{key}" for number in range(count)]
    base: bytes | None = None
    for number, layout in enumerate(layouts):
        if (layout / "index.json").exists():
            continue
        if base is None:
            base = rootfs.read_bytes()
        log(f"converting scale image {number + 1}/{count} (once; cached in {layout})")
        layer = oci.seekable_layer(_with_own_file(base, number), "estargz")
        scratch = Path(tempfile.mkdtemp(prefix="layout.", dir=CACHE))
        oci.write_layout(scratch, [layer], tag="latest", cmd=("python3",))
        layout.parent.mkdir(parents=True, exist_ok=True)
        scratch.rename(layout)
    return layouts


# -- measuring a process ----------------------------------------------------------------------

def _pid_running(needle: str) -> int | None:
    """The pid of the process whose command line contains ``needle``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            return int(entry.name)
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# -- one arm ----------------------------------------------------------------------------------

@dataclass
class ArmResult:
    arm: str
    first_output_s: list[float] = field(default_factory=list)
    pull_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    daemon_cpu_s: float = 0.0
    daemon_peak_rss: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0


def _ctr(containerd: RunningContainerd) -> list[str]:
    return ["ctr", "--address", str(containerd.address), "--namespace", containerd.namespace]


def _pull_command(arm: str, reference: str, containerd: RunningContainerd,
                  hosts_dir: Path, daemon_address: Path | None) -> list[str]:
    if arm == "stargz":
        # rpull is ctr-remote's (stargz-snapshotter's ctr): it adds the labels stargz needs.
        return ["ctr-remote", "--address", str(containerd.address), "--namespace",
                containerd.namespace, "images", "rpull", "--plain-http", reference]
    return [str(LAZYSNAP), "pull", reference, "--snapshotter", "lazysnap",
            "--address", str(containerd.address), "--namespace", containerd.namespace,
            "--hosts-dir", str(hosts_dir), "--snapshotter-address", str(daemon_address)]


def _start_image(arm: str, number: int, reference: str, containerd: RunningContainerd,
                 hosts_dir: Path, daemon_address: Path | None, containers: int,
                 started: float, result: ArmResult, lock: threading.Lock) -> None:
    """Pull one image, then start its containers at once and wait for their first lines."""
    pulled = subprocess.run(
        _pull_command(arm, reference, containerd, hosts_dir, daemon_address),
        capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)
    with lock:
        result.pull_s.append(time.monotonic() - started)
    if pulled.returncode != 0:
        with lock:
            result.failures.append(f"pull {number}: {pulled.stderr.strip()[-300:]}")
        return
    snapshotter = "stargz" if arm == "stargz" else "lazysnap"
    processes = [
        subprocess.Popen(
            [*_ctr(containerd), "run", "--rm", "--snapshotter", snapshotter, reference,
             f"s{number}-{index}", *WORKLOAD],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for index in range(containers)
    ]

    def first_line(process: subprocess.Popen[bytes], index: int) -> None:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        at = time.monotonic() - started
        _, errors = process.communicate(timeout=STEP_TIMEOUT)
        with lock:
            if process.returncode == 0 and line.strip() == b"hello":
                result.first_output_s.append(at)
            else:
                result.failures.append(
                    f"container {number}-{index}: exit {process.returncode}: "
                    f"{errors.decode(errors='replace').strip()[-300:]}")

    waiters = [threading.Thread(target=first_line, args=(process, index))
               for index, process in enumerate(processes)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()


def measure_arm(arm: str, references: Sequence[str], containers: int, proxy: LinkProxy,
                workdir: Path, stargz_grpc: Path | None) -> ArmResult:
    result = ArmResult(arm)
    hosts_dir = workdir / "hosts"
    hosts_dir.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if arm == "stargz":
            assert stargz_grpc is not None
            stargz = stack.enter_context(running_stargz(
                workdir / "s", stargz_grpc, references[0].split("/", 1)[0]))
            daemon_address = None
            pid = _pid_running(str(workdir / "s" / "root"))
            containerd = stack.enter_context(run_containerd(
                workdir / "c", workdir / "no-lazysnap.sock",
                extra_proxy_plugins={"stargz": stargz}))
        else:
            daemon = stack.enter_context(running_daemon(
                workdir / "d", extra_args=["--log-level", "info"]))
            daemon_address = daemon.address
            pid = daemon.process.pid if daemon.process is not None else None
            containerd = stack.enter_context(run_containerd(workdir / "c", daemon.address))
        if pid is None:
            raise RuntimeError(f"{arm}: cannot find the snapshotter daemon's process")
        cpu_before = cpu_seconds(pid)
        before = proxy.counters()
        lock = threading.Lock()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(references)) as pool:
            futures = [
                pool.submit(_start_image, arm, number, reference, containerd, hosts_dir,
                            daemon_address, containers, started, result, lock)
                for number, reference in enumerate(references)
            ]
            for future in futures:
                future.result()
        result.wall_s = time.monotonic() - started
        result.daemon_cpu_s = cpu_seconds(pid) - cpu_before
        result.daemon_peak_rss = peak_rss(pid)
        result.bytes_down = proxy.counters().minus(before).bytes_down
    return result


# -- the report -------------------------------------------------------------------------------

def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def render(results: Sequence[ArmResult], expected: int, link: str) -> str:
    rows = [f"scale: {expected} containers per arm, link {link}",
            f"{'arm':10} {'ok':>5} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7} "
            f"{'pull p50':>9} {'CPU s':>7} {'peak RSS MB':>12} {'MB down':>8}"]
    for r in results:
        rows.append(
            f"{r.arm:10} {len(r.first_output_s):>5} {_quantile(r.first_output_s, 0.5):7.2f} "
            f"{_quantile(r.first_output_s, 0.9):7.2f} {_quantile(r.first_output_s, 0.99):7.2f} "
            f"{max(r.first_output_s, default=float('nan')):7.2f} "
            f"{statistics.median(r.pull_s) if r.pull_s else float('nan'):9.2f} "
            f"{r.daemon_cpu_s:7.1f} {r.daemon_peak_rss / 1e6:12.1f} {r.bytes_down / 1e6:8.1f}")
    by_arm = {r.arm: r for r in results}
    lazy, stargz = by_arm.get("lazysnap"), by_arm.get("stargz")
    if lazy and stargz and lazy.first_output_s and stargz.first_output_s:
        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "n/a"
        lazy_s, stargz_s = lazy.first_output_s, stargz.first_output_s
        rows.append(
            "lazysnap / stargz-snapshotter: "
            f"p50 {ratio(_quantile(lazy_s, 0.5), _quantile(stargz_s, 0.5))}, "
            f"p99 {ratio(_quantile(lazy_s, 0.99), _quantile(stargz_s, 0.99))}, "
            f"CPU {ratio(lazy.daemon_cpu_s, stargz.daemon_cpu_s)}, "
            f"peak RSS {ratio(lazy.daemon_peak_rss, stargz.daemon_peak_rss)}")
    for r in results:
        for failure in r.failures[:5]:
            rows.append(f"  {r.arm} failure: {failure}")
        if len(r.failures) > 5:
            rows.append(f"  {r.arm}: {len(r.failures) - 5} more failures")
    return "\n".join(rows)


@contextlib.contextmanager
def scratch(prefix: str = "lzs") -> Iterator[Path]:
    """A scratch directory under /tmp, its mounts undone and its files removed at the end."""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: unix socket paths
    try:
        yield top
    finally:
        unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--containers", type=int, default=5, help="containers per image")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--mbit", type=float, default=0.0, help="link rate (0: loopback)")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise SystemExit(f"--arms: a list of {', '.join(ARMS)}")
    if args.images < 1 or args.containers < 1:
        raise SystemExit("--images and --containers must be at least 1")
    layouts = ensure_images(args.images)
    compile_lazysnap()
    stargz_grpc = ensure_stargz_grpc() if "stargz" in arms else None
    link = f"{args.mbit:g} Mbit/s + {args.rtt_ms:g} ms" if args.mbit else "loopback"
    results: list[ArmResult] = []
    with scratch() as top, run_registry(top / "registry") as registry:
        for number, layout in enumerate(layouts):
            oci.push_layout(layout, "latest", f"{registry.host}/{REPOSITORY}{number}:latest")
        host, port = registry.host.rsplit(":", 1)
        for arm in arms:
            proxy = LinkProxy((host, int(port)), mbit=args.mbit, rtt_ms=args.rtt_ms,
                              lifetime=7200.0)
            proxy.start()
            try:
                references = [f"{proxy.address}/{REPOSITORY}{n}:latest"
                              for n in range(len(layouts))]
                log(f"{arm}: {len(references)} images x {args.containers} containers ...")
                workdir = top / arm[:2]
                try:
                    results.append(measure_arm(arm, references, args.containers, proxy,
                                               workdir, stargz_grpc))
                finally:
                    unmount_under(workdir)
            finally:
                proxy.stop()
    print(render(results, args.images * args.containers, link), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"link": link, "images": args.images, "containers": args.containers,
             "results": [asdict(r) for r in results], "repo": str(REPO)}, indent=1))
    expected = args.images * args.containers
    return 0 if all(len(r.first_output_s) == expected for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
