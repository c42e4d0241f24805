#!/usr/bin/env python3
"""Many images and containers started at once against one snapshotter daemon (issue 13).

``--images`` distinct eStargz images (the startup benchmark's Debian root file system, each with
one file of its own, so no two share a layer) are pulled at the same moment, and as soon as an
image's pull returns, ``--containers`` containers of it are started at once, each running the
``hello`` workload. Arms: ``lazysnap`` (``lazysnap pull`` + ``ctr run --snapshotter lazysnap``)
and ``stargz`` (stargz-snapshotter 0.12: ``ctr-remote images rpull`` + ``ctr run --snapshotter
stargz``); ``cri-lazysnap`` and ``cri-stargz`` do what kubelet does for 20 Deployments of 5
replicas: no pull command, every image's CRI PullImage sent at once to containerd's CRI plugin
(which labels each layer's Prepare with ``cri.*`` annotations for the snapshotter), and as each
returns, 5 pods (RunPodSandbox, CreateContainer, StartContainer; host network, the pause image
pulled before the clock starts), first output read from the container's CRI log file. The arms
run one after the other on fresh containerd, snapshotter and registry-proxy state.

Printed per arm: time to first output of every container from the common start (p50, p90,
p99, max), the pulls' median, the failures, the snapshotter daemon's and containerd's CPU
seconds (user + system, from ``/proc/<pid>/stat`` at the end), the daemon's peak RSS
(``VmHWM``), and the bytes the registry link carried; then lazysnap's values as a ratio of
stargz-snapshotter's (ctr arms and CRI arms apart), measured in the same run.

    .venv/bin/python benchmarks/scale.py                         # 20 images x 5, loopback
    .venv/bin/python benchmarks/scale.py --mbit 100 --rtt-ms 20  # over a limited link
    .venv/bin/python benchmarks/scale.py --images 4 --containers 2 --arms lazysnap
    .venv/bin/python benchmarks/scale.py --arms cri-lazysnap,cri-stargz
    .venv/bin/python benchmarks/scale.py --arms cri-lazysnap --py-spy DIR --metrics DIR
    .venv/bin/python benchmarks/scale.py --arms cri-lazysnap,cri-stargz \
        --lazy-setting 'background_fetch = false'

``--py-spy DIR`` samples lazysnap's daemon with py-spy (``pip install py-spy``) for the arm's
whole run: ``DIR/<arm>.txt`` has its collapsed stacks, one per thread, for a flame graph or grep.
``--metrics DIR`` serves the daemon's Prometheus metrics on a private unix socket and saves
them at the arm's end to ``DIR/<arm>.prom`` (Prepare durations, mounts, TOC loads, FUSE reads).

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
import signal
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

from cri_start import push_pause_image, start_pod_through_cri
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
from tests.support.containerd import CriSettings, RunningContainerd, run_containerd
from tests.support.cri import CriClient, cri_client
from tests.support.daemon import running_daemon
from tests.support.docker_registry import run_registry

ARMS = ("lazysnap", "stargz", "cri-lazysnap", "cri-stargz")
DEFAULT_ARMS = ("lazysnap", "stargz")
CRI_ARMS = ("cri-lazysnap", "cri-stargz")
STARGZ_ARMS = ("stargz", "cri-stargz")
# Each lazysnap arm and its stargz-snapshotter counterpart in the report's ratio lines.
PAIRS = (("lazysnap", "stargz", "lazysnap / stargz-snapshotter"),
         ("cri-lazysnap", "cri-stargz", "CRI lazysnap / stargz-snapshotter"))
WORKLOAD = ["python3", "-c", 'print("hello")']
REPOSITORY = "bench/scale"
# A pull or a container that has not finished by then counts as failed.
STEP_TIMEOUT = 900.0
# The CRI arms look at 100 log files at once; at startup.py's 5 ms that would cost the benchmark
# itself most of a core on a 2-core machine, and 50 ms is small against seconds of start-up.
CRI_LOG_POLL = 0.05


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
    containerd_cpu_s: float = 0.0
    daemon_peak_rss: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0


def _ctr(containerd: RunningContainerd) -> list[str]:
    return ["ctr", "--address", str(containerd.address), "--namespace", containerd.namespace]


def _pull_command(arm: str, reference: str, containerd: RunningContainerd,
                  hosts_dir: Path, daemon_address: Path | None) -> list[str]:
    if arm in STARGZ_ARMS:
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
    snapshotter = "stargz" if arm in STARGZ_ARMS else "lazysnap"
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


def _start_image_cri(client: CriClient, number: int, reference: str, containers: int,
                     pods: Path, started: float, result: ArmResult,
                     lock: threading.Lock) -> None:
    """kubelet's way: PullImage, then as it returns one pod per replica, all at once."""
    try:
        client.pull(reference)
    except Exception as exc:  # grpc.RpcError: one failed pull must not end the run
        with lock:
            result.pull_s.append(time.monotonic() - started)
            result.failures.append(f"pull {number}: {str(exc).strip()[-300:]}")
        return
    with lock:
        result.pull_s.append(time.monotonic() - started)

    def pod(index: int) -> None:
        try:
            times = start_pod_through_cri(client, reference, WORKLOAD, pods,
                                          f"s{number}-{index}", started, STEP_TIMEOUT,
                                          poll=CRI_LOG_POLL)
        except Exception as exc:  # a failed pod is counted, the others go on
            with lock:
                result.failures.append(f"pod {number}-{index}: {str(exc).strip()[-300:]}")
            return
        with lock:
            if times.exit_code == 0 and times.first_line.strip() == "hello":
                result.first_output_s.append(times.first_output_s)
            else:
                result.failures.append(f"pod {number}-{index}: exit {times.exit_code}, "
                                       f"first line {times.first_line[:80]!r}")

    starters = [threading.Thread(target=pod, args=(index,)) for index in range(containers)]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join()


@contextlib.contextmanager
def _sampled(pid: int | None, output: Path | None) -> Iterator[None]:
    """py-spy record on ``pid`` while the block runs (``output`` None: nothing)."""
    if pid is None or output is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    # --nonblocking: the daemon is not paused for each sample, so it runs as unprofiled;
    # --threads: the stacks say which thread (trio, gRPC, FUSE) spent the time.
    sampler = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "100",
                                "--nonblocking", "--threads", "--format", "raw",
                                "--output", str(output)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached before the clock starts
    try:
        yield
    finally:
        sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            _, errors = sampler.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sampler.kill()
            _, errors = sampler.communicate()
        log(f"    py-spy: {output} ({errors.decode(errors='replace').strip()[-200:]})")


def _save_metrics(socket: Path, output: Path) -> None:
    """The daemon's /metrics, read over its unix socket."""
    output.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["curl", "-sf", "--unix-socket", str(socket),
                           "http://localhost/metrics", "-o", str(output)], check=False)
    log(f"    metrics: {output}" if done.returncode == 0 else
        f"    metrics: curl exited {done.returncode}")


def measure_arm(arm: str, references: Sequence[str], containers: int, proxy: LinkProxy,
                workdir: Path, stargz_grpc: Path | None, *, pause: str = "",
                py_spy: Path | None = None, metrics: Path | None = None,
                lazy_settings: Sequence[str] = ()) -> ArmResult:
    """One arm on fresh state. ``pause``: the sandbox image, for the CRI arms; ``py_spy`` and
    ``metrics``: directories for lazysnap's daemon's profile and metrics (None: not taken);
    ``lazy_settings``: ``[lazy]`` lines for lazysnap's daemon's config."""
    result = ArmResult(arm)
    hosts_dir = workdir / "hosts"
    hosts_dir.mkdir(parents=True)
    cri = CriSettings(sandbox_image=pause, snapshotter="stargz" if arm in STARGZ_ARMS
                      else "lazysnap") if arm in CRI_ARMS else None
    metrics_socket = workdir / "d" / "m.sock"
    with contextlib.ExitStack() as stack:
        if arm in STARGZ_ARMS:
            assert stargz_grpc is not None
            stargz = stack.enter_context(running_stargz(
                workdir / "s", stargz_grpc, references[0].split("/", 1)[0]))
            daemon_address = None
            pid = _pid_running(str(workdir / "s" / "root"))
            containerd = stack.enter_context(run_containerd(
                workdir / "c", workdir / "no-lazysnap.sock",
                extra_proxy_plugins={"stargz": stargz}, cri=cri))
        else:
            daemon_args = ["--metrics-address", f"unix:{metrics_socket}"] if metrics else []
            if lazy_settings:
                config = workdir / "lazysnap.toml"
                config.write_text("[lazy]\n" + "".join(f"{line}\n" for line in lazy_settings))
                daemon_args += ["--config", str(config)]
            daemon = stack.enter_context(running_daemon(
                workdir / "d", extra_args=["--log-level", "info", *daemon_args]))
            daemon_address = daemon.address
            pid = daemon.process.pid if daemon.process is not None else None
            containerd = stack.enter_context(run_containerd(workdir / "c", daemon.address,
                                                            cri=cri))
        if pid is None:
            raise RuntimeError(f"{arm}: cannot find the snapshotter daemon's process")
        client = stack.enter_context(cri_client(containerd.address)) if cri else None
        if client is not None:
            client.pull(pause)  # a node has its pause image: pulled before the clock starts
        stack.enter_context(_sampled(pid if arm not in STARGZ_ARMS else None,
                                     py_spy / f"{arm}.txt" if py_spy else None))
        cpu_before = cpu_seconds(pid)
        containerd_before = cpu_seconds(containerd.process.pid)
        before = proxy.counters()
        lock = threading.Lock()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(references)) as pool:
            if client is not None:
                futures = [
                    pool.submit(_start_image_cri, client, number, reference, containers,
                                workdir / "pods", started, result, lock)
                    for number, reference in enumerate(references)
                ]
            else:
                futures = [
                    pool.submit(_start_image, arm, number, reference, containerd, hosts_dir,
                                daemon_address, containers, started, result, lock)
                    for number, reference in enumerate(references)
                ]
            for future in futures:
                future.result()
        result.wall_s = time.monotonic() - started
        result.daemon_cpu_s = cpu_seconds(pid) - cpu_before
        result.containerd_cpu_s = cpu_seconds(containerd.process.pid) - containerd_before
        result.daemon_peak_rss = peak_rss(pid)
        result.bytes_down = proxy.counters().minus(before).bytes_down
        if metrics is not None and arm not in STARGZ_ARMS:
            _save_metrics(metrics_socket, metrics / f"{arm}.prom")
    return result


# -- the report -------------------------------------------------------------------------------

def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def render(results: Sequence[ArmResult], expected: int, link: str) -> str:
    rows = [f"scale: {expected} containers per arm, link {link}",
            f"{'arm':12} {'ok':>5} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7} "
            f"{'pull p50':>9} {'CPU s':>7} {'ctrd CPU':>9} {'peak RSS MB':>12} {'MB down':>8}"]
    for r in results:
        rows.append(
            f"{r.arm:12} {len(r.first_output_s):>5} {_quantile(r.first_output_s, 0.5):7.2f} "
            f"{_quantile(r.first_output_s, 0.9):7.2f} {_quantile(r.first_output_s, 0.99):7.2f} "
            f"{max(r.first_output_s, default=float('nan')):7.2f} {_median(r.pull_s):9.2f} "
            f"{r.daemon_cpu_s:7.1f} {r.containerd_cpu_s:9.1f} {r.daemon_peak_rss / 1e6:12.1f} "
            f"{r.bytes_down / 1e6:8.1f}")
    by_arm = {r.arm: r for r in results}
    for lazy_arm, stargz_arm, title in PAIRS:
        lazy, stargz = by_arm.get(lazy_arm), by_arm.get(stargz_arm)
        if not (lazy and stargz and lazy.first_output_s and stargz.first_output_s):
            continue
        lazy_s, stargz_s = lazy.first_output_s, stargz.first_output_s
        rows.append(
            f"{title}: "
            f"p50 {_ratio(_quantile(lazy_s, 0.5), _quantile(stargz_s, 0.5))}, "
            f"p99 {_ratio(_quantile(lazy_s, 0.99), _quantile(stargz_s, 0.99))}, "
            f"pull p50 {_ratio(_median(lazy.pull_s), _median(stargz.pull_s))}, "
            f"CPU {_ratio(lazy.daemon_cpu_s, stargz.daemon_cpu_s)}, "
            f"peak RSS {_ratio(lazy.daemon_peak_rss, stargz.daemon_peak_rss)}, "
            f"MB down {_ratio(lazy.bytes_down, stargz.bytes_down)}")
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


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The options and the arms to run, in the order given; bad ones end with a message."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--containers", type=int, default=5,
                        help="containers per image (pods per image in the CRI arms)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"a comma-separated list of {', '.join(ARMS)}")
    parser.add_argument("--mbit", type=float, default=0.0, help="link rate (0: loopback)")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--lazy-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a [lazy] line for lazysnap's daemon's config, in TOML "
                        "(repeatable), such as 'background_fetch = false'")
    parser.add_argument("--py-spy", metavar="DIR", type=Path,
                        help="sample lazysnap's daemon with py-spy into DIR/<arm>.txt")
    parser.add_argument("--metrics", metavar="DIR", type=Path,
                        help="save lazysnap's daemon's /metrics to DIR/<arm>.prom")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown:
        parser.error(f"--arms: {', '.join(unknown) or 'empty'}; choose from {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        parser.error("--arms: an arm named twice")
    if args.images < 1 or args.containers < 1:
        parser.error("--images and --containers must be at least 1")
    return args, arms


def main(argv: list[str] | None = None) -> int:
    args, arms = parse_arguments(argv)
    layouts = ensure_images(args.images)
    compile_lazysnap()
    stargz_grpc = ensure_stargz_grpc() if any(a in STARGZ_ARMS for a in arms) else None
    link = f"{args.mbit:g} Mbit/s + {args.rtt_ms:g} ms" if args.mbit else "loopback"
    results: list[ArmResult] = []
    with scratch() as top, run_registry(top / "registry") as registry:
        for number, layout in enumerate(layouts):
            oci.push_layout(layout, "latest", f"{registry.host}/{REPOSITORY}{number}:latest")
        pause = push_pause_image(top / "pause", registry.host) \
            if any(a in CRI_ARMS for a in arms) else ""
        host, port = registry.host.rsplit(":", 1)
        for arm in arms:
            proxy = LinkProxy((host, int(port)), mbit=args.mbit, rtt_ms=args.rtt_ms,
                              lifetime=7200.0)
            proxy.start()
            try:
                references = [f"{proxy.address}/{REPOSITORY}{n}:latest"
                              for n in range(len(layouts))]
                log(f"{arm}: {len(references)} images x {args.containers} containers ...")
                workdir = top / f"a{arms.index(arm)}"
                try:
                    results.append(measure_arm(arm, references, args.containers, proxy,
                                               workdir, stargz_grpc, pause=pause,
                                               py_spy=args.py_spy, metrics=args.metrics,
                                               lazy_settings=args.lazy_setting))
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
