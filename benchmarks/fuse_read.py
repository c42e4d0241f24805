"""FUSE read benchmark: lazysnap mounts vs the same files in a plain directory, in one run.

    sudo .venv/bin/python benchmarks/fuse_read.py [--big-mib 256] [--files 50000]
                                                  [--rss-entries 100000]

Measures (each lazysnap mount is a ``lazysnap mount --blob`` subprocess, as a user would run it):

* cold sequential read of one big file from a local eStargz blob (fresh mount, empty cache; best
  of 3) vs a plain single-pass decompression of the same blob (best of 3);
* warm sequential read of that file (kernel page cache) vs the same file in a plain directory;
* cold and warm ``os.walk`` + ``lstat`` over a layer of many small files vs the plain directory;
* TOC load (``load_layer_index``) time for that layer, i.e. what attach waits for;
* RSS of the ``lazysnap mount`` process with a layer of many entries attached (after a walk),
  against the RSS of the same command with a one-file layer, and its peak RSS (VmHWM) while it
  indexed that layer (``--only-memory`` runs just this);
* a lazy start without FUSE: every file of a stdlib slice read once, in tar order, from a blob
  20 ms away, with range coalescing vs one request per chunk;
* the cost of metrics: cold reads of the big file with ``/metrics`` scraped at 10 Hz vs not
  scraped, interleaved (both mounts serve ``/metrics``; ``--only-scrape`` runs just this);
* ``--only-warm``: warm sequential reads and warm walks only, each with the mount process's CPU
  over them; with ``--base-lazysnap OTHER_TREE/.venv/bin/lazysnap`` that tree's mounts are
  measured in turn with this tree's (two rounds, alternating which goes first);
* FUSE passthrough: warm sequential reads of the big file and warm open+read+close of many
  small files, on a mount that does not ask for passthrough (page cache, zero-message opens)
  and on one that does (every OPEN answered; the big file read from its verified backing copy),
  against the plain directory (``--only-passthrough`` runs just this). Those mounts are served
  by this script in a child process (``--serve``), since ``lazysnap mount`` has no switch.

Prints a table with ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusefs import FetchConfig, LocalFileBlob  # noqa: E402
from fusefs.cache import ChunkCache  # noqa: E402
from fusefs.fetcher import ChunkFetcher  # noqa: E402
from fusefs.formats import load_layer_index, write_estargz  # noqa: E402
from fusefs.layer import Layer  # noqa: E402

LAZYSNAP = REPO / ".venv" / "bin" / "lazysnap"
MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f)


@contextmanager
def lazysnap_mount(blob: Path, mnt: Path, *extra: str) -> Iterator[int]:
    mnt.mkdir(parents=True, exist_ok=True)
    log = mnt.with_name(mnt.name + ".log")
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [str(LAZYSNAP), "mount", "--blob", str(blob), str(mnt), *extra],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 120
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                output = log.read_text(errors="replace")
                raise RuntimeError(f"lazysnap mount of {blob} did not come up: {output}")
            time.sleep(0.02)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(runs: int, fn: Callable[[], object]) -> float:
    """The fastest of ``runs`` timings: warm numbers are noisy on a shared machine."""
    return min(timed(fn) for _ in range(runs))


def read_all(path: Path, block: int = MiB) -> int:
    buf = bytearray(block)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def walk_stat(root: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def gunzip_blob(blob: Path) -> int:
    """A plain single-pass decompression of every gzip member of the blob, fed in 1 MiB pieces
    (what a full pull does before unpacking)."""
    total = 0
    inflater = zlib.decompressobj(wbits=31)
    with open(blob, "rb", buffering=0) as f:
        while piece := f.read(MiB):
            data = piece
            while data:
                total += len(inflater.decompress(data))
                if not inflater.eof:
                    break
                data = inflater.unused_data  # the next member starts here
                inflater = zlib.decompressobj(wbits=31)
    return total


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def tree_tar(files: int, per_dir: int = 100, size: int = 64) -> bytes:
    """A layer of ``files`` small files in directories of ``per_dir`` (built in memory)."""
    out = io.BytesIO()
    payload = b"x" * size
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for d in range((files + per_dir - 1) // per_dir):
            info = tarfile.TarInfo(f"d{d:05d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
            for i in range(min(per_dir, files - d * per_dir)):
                info = tarfile.TarInfo(f"d{d:05d}/f{i:03d}")
                info.size = size
                archive.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def make_estargz(tar_bytes: bytes, blob: Path) -> None:
    with open(blob, "wb") as out:
        write_estargz(io.BytesIO(tar_bytes), out)


# -- the measurements ------------------------------------------------------------------------


def big_file(work: Path, mib: int, rows: list[tuple[str, str, str, str]]) -> None:
    plain = work / "plain-big"
    plain.mkdir()
    # Half random, half text: compressible like real binaries, not a trivial zero run.
    rnd = os.urandom(MiB // 2)
    text = b"".join(b"line %08d of a moderately compressible file\n" % i for i in range(11000))
    block = (rnd + text)[:MiB]
    with open(plain / "big.bin", "wb") as f:
        for i in range(mib):
            f.write(block[i % 7 :] + block[: i % 7])
    tar_path = work / "big.tar"
    subprocess.run(["tar", "-C", str(plain), "-cf", str(tar_path), "big.bin"], check=True)
    blob = work / "big.esgz"
    make_estargz(tar_path.read_bytes(), blob)
    size = mib * MiB

    assert gunzip_blob(blob) > size
    decompress = best_of(3, lambda: gunzip_blob(blob))
    native: dict[int, float] = {}
    warm: dict[int, float] = {}
    read_all(plain / "big.bin")
    for block in (128 * 1024, MiB):
        native[block] = best_of(5, lambda b=block: read_all(plain / "big.bin", b))
    cold = float("inf")
    for attempt in range(3):  # a fresh mount and an empty cache each time
        cache = str(work / f"cache-big-{attempt}")
        with lazysnap_mount(blob, work / "mnt-big", "--no-background-fetch", "--cache-dir", cache):
            cold = min(cold, timed(lambda: read_all(work / "mnt-big" / "big.bin")))
    warm_args = ("--no-background-fetch", "--cache-dir", str(work / "cache-big-0"))
    with lazysnap_mount(blob, work / "mnt-big", *warm_args):
        read_all(work / "mnt-big" / "big.bin")  # from the disk cache into the page cache
        for block in (128 * 1024, MiB):
            warm[block] = best_of(5, lambda b=block: read_all(work / "mnt-big" / "big.bin", b))
    rows.append(
        (
            f"cold seq read {mib} MiB (MB/s)",
            f"{size / cold / 1e6:.0f}",
            f"{size / decompress / 1e6:.0f} (gunzip blob)",
            f"{decompress / cold:.2f}",
        )
    )
    for block in (128 * 1024, MiB):
        rows.append(
            (
                f"warm seq read {mib} MiB, {block // 1024} KiB reads (MB/s)",
                f"{size / warm[block] / 1e6:.0f}",
                f"{size / native[block] / 1e6:.0f} (plain dir)",
                f"{native[block] / warm[block]:.2f}",
            )
        )


def big_blob(work: Path, mib: int) -> Path:
    """An eStargz blob of one file of ``mib`` MiB, half random, half text."""
    plain = work / "plain-scrape"
    plain.mkdir()
    rnd = os.urandom(MiB // 2)
    text = b"".join(b"line %08d of a moderately compressible file\n" % i for i in range(11000))
    block = (rnd + text)[:MiB]
    with open(plain / "big.bin", "wb") as f:
        for i in range(mib):
            f.write(block[i % 7 :] + block[: i % 7])
    tar_path = work / "scrape.tar"
    subprocess.run(["tar", "-C", str(plain), "-cf", str(tar_path), "big.bin"], check=True)
    blob = work / "scrape.esgz"
    make_estargz(tar_path.read_bytes(), blob)
    return blob


class Scraper:
    """GETs ``url`` every ``1 / hz`` seconds on a thread, as a Prometheus would."""

    def __init__(self, url: str, hz: float) -> None:
        self.url = url
        self.period = 1.0 / hz
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            start = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as answer:
                answer.read()
            self.latencies.append(time.perf_counter() - start)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape_overhead(
    work: Path, mib: int, rows: list[tuple[str, str, str, str]], *, pairs: int = 5,
    hz: float = 10.0,
) -> None:
    """Cold sequential reads with and without a 10 Hz scraper, alternating which goes first."""
    blob = big_blob(work, mib)
    size = mib * MiB
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}  # the mount process's, per read
    latencies: list[float] = []
    for pair in range(pairs):
        for scraped in ((False, True) if pair % 2 == 0 else (True, False)):
            address = f"127.0.0.1:{free_port()}"
            cache = str(work / f"cache-scrape-{pair}-{int(scraped)}")
            with lazysnap_mount(blob, work / "mnt-scrape", "--no-background-fetch",
                                "--cache-dir", cache, "--metrics-address", address) as pid:
                before = cpu_seconds(pid)
                if scraped:
                    with Scraper(f"http://{address}/metrics", hz) as scraper:
                        times[True].append(timed(lambda: read_all(work / "mnt-scrape" / "big.bin")))
                    latencies += scraper.latencies
                else:
                    times[False].append(timed(lambda: read_all(work / "mnt-scrape" / "big.bin")))
                cpu[scraped].append(cpu_seconds(pid) - before)
    for scraped in (False, True):
        print(f"cold read {mib} MiB, scraped={scraped}: "
              + ", ".join(f"{size / t / 1e6:.0f}" for t in times[scraped]) + " MB/s; CPU s "
              + ", ".join(f"{c:.2f}" for c in cpu[scraped]))
    print(f"scrapes: {len(latencies)}, median latency "
          f"{statistics.median(latencies) * 1e3:.1f} ms" if latencies else "scrapes: none")
    quiet, busy = statistics.median(times[False]), statistics.median(times[True])
    quiet_cpu, busy_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
    rows.append(
        (
            f"mount process CPU for that read, /metrics at {hz:g} Hz (s, median)",
            f"{busy_cpu:.2f}",
            f"{quiet_cpu:.2f} (not scraped)",
            f"{quiet_cpu / busy_cpu:.2f}",
        )
    )
    rows.append(
        (
            f"cold seq read {mib} MiB, /metrics at {hz:g} Hz (MB/s, median of {pairs})",
            f"{size / busy / 1e6:.0f}",
            f"{size / quiet / 1e6:.0f} (not scraped)",
            f"{quiet / busy:.2f}",
        )
    )


def tree_both_ways(work: Path, files: int) -> tuple[Path, Path]:
    """A tree of ``files`` small files as a plain directory and as an eStargz blob."""
    tar_bytes = tree_tar(files)
    plain = work / "plain-tree"
    plain.mkdir()
    subprocess.run(["tar", "-C", str(plain), "-xf", "-"], input=tar_bytes, check=True)
    blob = work / "tree.esgz"
    make_estargz(tar_bytes, blob)
    return plain, blob


def many_files(work: Path, files: int, rows: list[tuple[str, str, str, str]]) -> None:
    plain, blob = tree_both_ways(work, files)

    async def load() -> float:
        local = await LocalFileBlob.open(blob)
        start = time.perf_counter()
        await load_layer_index(local)
        elapsed = time.perf_counter() - start
        local.close()
        return elapsed

    attach = min(trio.run(load) for _ in range(3))
    native_cold = timed(lambda: walk_stat(plain))  # dentries may be cached: a lower bound
    native_warm = best_of(3, lambda: walk_stat(plain))
    with lazysnap_mount(blob, work / "mnt-tree", "--cache-dir", str(work / "cache-tree")):
        cold = timed(lambda: walk_stat(work / "mnt-tree"))
        warm = best_of(3, lambda: walk_stat(work / "mnt-tree"))
    entries = files + files // 100
    rows.append(
        (
            f"walk+lstat {entries} entries, cold (s)",
            f"{cold:.3f}",
            f"{native_cold:.3f}",
            f"{native_cold / cold:.2f}",
        )
    )
    rows.append(
        (
            f"walk+lstat {entries} entries, warm (s)",
            f"{warm:.3f}",
            f"{native_warm:.3f}",
            f"{native_warm / warm:.2f}",
        )
    )
    rows.append(
        (
            f"TOC load for {entries} entries (s)",
            f"{attach:.3f}",
            "target 0.5",
            f"{0.5 / attach:.2f}",
        )
    )


def memory(work: Path, entries: int, rows: list[tuple[str, str, str, str]]) -> None:
    small = work / "one.esgz"
    make_estargz(tree_tar(1), small)
    big = work / "rss.esgz"
    make_estargz(tree_tar(entries, per_dir=1000, size=16), big)
    with lazysnap_mount(small, work / "mnt-one") as pid:
        walk_stat(work / "mnt-one")
        base = rss_kib(pid)
    with lazysnap_mount(big, work / "mnt-rss", "--no-background-fetch") as pid:
        attached = rss_kib(pid)
        peak = rss_kib(pid, "VmHWM")  # the index build's peak: nothing else ran yet
        walk_stat(work / "mnt-rss")
        walked = rss_kib(pid)
    rows.append(
        (
            f"RSS, {entries} entries attached (MB)",
            f"{attached / 1024:.1f}",
            f"{base / 1024:.1f} (1 entry)",
            f"{(attached - base) / 1024:.1f} MB more",
        )
    )
    rows.append(
        (
            f"peak RSS while indexing {entries} entries (MB)",
            f"{peak / 1024:.1f}",
            "",
            "",
        )
    )
    rows.append(
        (
            f"RSS, after walking {entries} (MB)",
            f"{walked / 1024:.1f}",
            "target 60",
            f"{60 / (walked / 1024):.2f}",
        )
    )


class SlowBlob:
    """A local blob behind a fixed per-request latency (a registry ``rtt`` away)."""

    def __init__(self, blob: LocalFileBlob, rtt: float) -> None:
        self._blob = blob
        self._rtt = rtt
        self.requests = 0

    @property
    def size(self) -> int:
        return self._blob.size

    @property
    def digest(self) -> str:
        return self._blob.digest

    async def read_at(self, offset: int, length: int) -> bytes:
        self.requests += 1
        await trio.sleep(self._rtt)
        return await self._blob.read_at(offset, length)


def lazy_start(work: Path, rows: list[tuple[str, str, str, str]], rtt: float = 0.02) -> None:
    """Read every file of a stdlib slice once, in tar order, through the fetcher (no FUSE) from
    a blob ``rtt`` away: coalesced ranges vs one request per chunk."""
    tree = work / "stdlib"
    shutil.copytree("/usr/lib/python3.11/json", tree / "json")
    shutil.copytree("/usr/lib/python3.11/email", tree / "email")
    shutil.copytree("/usr/lib/python3.11/asyncio", tree / "asyncio")
    tar_path = work / "stdlib.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(tar_path), "."], check=True)
    blob_path = work / "stdlib.esgz"
    make_estargz(tar_path.read_bytes(), blob_path)

    async def read_everything(config: FetchConfig) -> tuple[float, int, int]:
        local = await LocalFileBlob.open(blob_path)
        slow = SlowBlob(local, rtt)
        index = await load_layer_index(local)
        layer = Layer("bench", 1, slow, index)
        with tempfile.TemporaryDirectory(dir=work) as cache_dir:
            cache = await ChunkCache.open(Path(cache_dir), capacity_bytes=1 << 30)
            async with trio.open_nursery() as nursery:
                fetcher = ChunkFetcher(cache, nursery, config)
                start = time.perf_counter()
                total = 0
                for entry in index.file_entries():
                    total += len(await fetcher.read(layer, entry, 0, index.attr(entry).size))
                elapsed = time.perf_counter() - start
                nursery.cancel_scope.cancel()
        local.close()
        return elapsed, slow.requests, total

    coalesced, requests, total = trio.run(read_everything, FetchConfig())
    single, single_requests, _ = trio.run(
        read_everything, FetchConfig(ondemand_range=1, max_gap=0, file_completion_window=0)
    )
    rows.append(
        (
            f"read {total // 1024} KiB of stdlib files, {rtt * 1000:.0f} ms RTT (s)",
            f"{coalesced:.2f} ({requests} req)",
            f"{single:.2f} ({single_requests} req, 1/chunk)",
            f"{single / coalesced:.2f}",
        )
    )


# -- FUSE passthrough ------------------------------------------------------------------------


def serve_blob(blob: Path, mnt: Path, cache: Path, passthrough: bool) -> int:
    """``--serve``: what ``lazysnap mount --blob --no-background-fetch`` does, with passthrough
    chosen; logs the backing copies to stderr so that the parent can wait for them."""
    import logging  # noqa: PLC0415

    from fusefs import LazyFilesystem  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    async def main() -> None:
        local = await LocalFileBlob.open(blob)
        index = await load_layer_index(local)
        fs = LazyFilesystem(mnt, cache, single_layer=True, passthrough=passthrough)
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        fs.unmount()
                        return

            async def run(*, task_status: trio.TaskStatus[None]) -> None:
                await fs.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop)
            await nursery.start(run)
            await fs.attach(blob.name, local, index, background_fetch=False)

    trio.run(main)
    return 0


@contextmanager
def served_mount(blob: Path, mnt: Path, cache: Path, passthrough: bool) -> Iterator[Path]:
    """A mount served by ``serve_blob`` in a child; yields the child's log."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = mnt.with_name(mnt.name + ".log")
    args = [sys.executable, __file__, "--serve", str(blob), str(mnt), str(cache),
            "on" if passthrough else "off"]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not is_mounted(mnt) or not any(os.scandir(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mount of {blob} did not come up: {log.read_text()}")
            time.sleep(0.02)
        yield log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def alternate(
    baseline: Callable[[], object], measured: Callable[[], object], runs: int = 9
) -> tuple[float, float]:
    """Best of ``runs`` timings of each, taken one after the other."""
    times = [(timed(baseline), timed(measured)) for _ in range(runs)]
    return min(t[0] for t in times), min(t[1] for t in times)


def open_read_close(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            total += len(f.read())
    return total


def passthrough_arms(work: Path, mib: int, rows: list[tuple[str, str, str, str]],
                     small_files: int = 2000) -> None:
    plain = work / "plain-passthrough"
    (plain / "small").mkdir(parents=True)
    rnd = os.urandom(MiB // 2)
    text = b"".join(b"line %08d of a moderately compressible file\n" % i for i in range(11000))
    block = (rnd + text)[:MiB]
    with open(plain / "big.bin", "wb") as f:
        for i in range(mib):
            f.write(block[i % 7 :] + block[: i % 7])
    for i in range(small_files):
        (plain / "small" / f"f{i:05d}").write_bytes(block[i : i + 4096])
    tar_path = work / "passthrough.tar"
    subprocess.run(["tar", "-C", str(plain), "-cf", str(tar_path), "big.bin", "small"],
                   check=True)
    blob = work / "passthrough.esgz"
    make_estargz(tar_path.read_bytes(), blob)
    size = mib * MiB
    names = sorted(os.listdir(plain / "small"))

    def smalls(root: Path) -> list[Path]:
        return [root / "small" / name for name in names]

    # Each arm against the plain directory measured alternately with it (best of 9 each), so
    # that the load of a shared machine weighs on both alike.
    big: dict[str, dict[int, tuple[float, float]]] = {}
    small: dict[str, tuple[float, float]] = {}
    read_all(plain / "big.bin")
    open_read_close(smalls(plain))
    cache = work / "cache-passthrough"
    with served_mount(blob, work / "mnt-fill", cache, passthrough=False):
        read_all(work / "mnt-fill" / "big.bin")  # every chunk into the disk cache
        open_read_close(smalls(work / "mnt-fill"))
    copies = 0
    for arm, on in (("page cache", False), ("passthrough", True)):
        mnt = work / f"mnt-{'on' if on else 'off'}"
        with served_mount(blob, mnt, cache, passthrough=on) as log:
            read_all(mnt / "big.bin")  # into the page cache; with passthrough, starts the copy
            open_read_close(smalls(mnt))
            if on:
                if "passthrough=on" not in log.read_text(errors="replace"):
                    print("this kernel does not offer FUSE passthrough", file=sys.stderr)
                deadline = time.monotonic() + 120
                while "backing file registered" not in log.read_text(errors="replace"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no backing copy: {log.read_text()}")
                    time.sleep(0.05)
                read_all(mnt / "big.bin")  # the backing copy's pages into the page cache
                copies = log.read_text(errors="replace").count("backing file registered")
            big[arm] = {b: alternate(lambda b=b: read_all(plain / "big.bin", b),
                                     lambda b=b, m=mnt: read_all(m / "big.bin", b))
                        for b in (128 * 1024, MiB)}
            small[arm] = alternate(lambda: open_read_close(smalls(plain)),
                                   lambda m=mnt: open_read_close(smalls(m)))
    for arm in ("page cache", "passthrough"):
        for b in (128 * 1024, MiB):
            native, lazy = big[arm][b]
            rows.append((
                f"warm seq read {mib} MiB, {b // 1024} KiB reads, {arm} (MB/s)",
                f"{size / lazy / 1e6:.0f}",
                f"{size / native / 1e6:.0f} (plain dir)",
                f"{native / lazy:.2f}",
            ))
        native, lazy = small[arm]
        rows.append((
            f"warm open+read+close {small_files} x 4 KiB, {arm} (s)",
            f"{lazy:.3f}",
            f"{native:.3f} (plain dir)",
            f"{native / lazy:.2f}",
        ))
    rows.append(("passthrough backing copies made", str(copies), "", ""))


def warm_arms(work: Path, mib: int, files: int, base: Path | None,
              rows: list[tuple[str, str, str, str]], rounds: int = 2) -> None:
    """``--only-warm``: warm sequential reads of the big file and warm walks of the many-file
    layer, each against the plain directory measured alternately with it, and with ``base``
    (another tree's ``lazysnap``) mounted in turn with this tree's, ``rounds`` times each, so
    that both trees see the same load."""
    blob = big_blob(work, mib)
    plain_big = work / "plain-scrape" / "big.bin"
    plain_tree, tree_blob = tree_both_ways(work, files)
    size = mib * MiB
    global LAZYSNAP
    ours = LAZYSNAP
    arms = [("this tree", ours)] + ([("base", base)] if base is not None else [])
    for round_number in range(rounds):
        for arm, binary in arms if round_number % 2 == 0 else arms[::-1]:
            LAZYSNAP = binary
            tag = f"{arm.replace(' ', '-')}-{round_number}"
            cache = work / f"cache-warm-{arm.replace(' ', '-')}"
            with lazysnap_mount(blob, work / f"mnt-warm-{tag}", "--no-background-fetch",
                                "--cache-dir", str(cache)) as pid:
                mnt = work / f"mnt-warm-{tag}"
                read_all(mnt / "big.bin")  # into the page cache
                before = cpu_seconds(pid)
                for b in (128 * 1024, MiB):
                    native, lazy = alternate(lambda b=b: read_all(plain_big, b),
                                             lambda b=b, m=mnt: read_all(m / "big.bin", b))
                    rows.append((f"[{arm}, round {round_number + 1}] warm seq read {mib} MiB, "
                                 f"{b // 1024} KiB reads (MB/s)", f"{size / lazy / 1e6:.0f}",
                                 f"{size / native / 1e6:.0f} (plain dir)", f"{native / lazy:.2f}"))
                rows.append((f"[{arm}, round {round_number + 1}] mount CPU over those reads (s)",
                             f"{cpu_seconds(pid) - before:.2f}", "", ""))
            with lazysnap_mount(tree_blob, work / f"mnt-walk-{tag}", "--no-background-fetch",
                                "--cache-dir", str(work / f"cache-walk-{tag}")) as pid:
                mnt = work / f"mnt-walk-{tag}"
                walk_stat(mnt)  # cold: the kernel caches entries and listings
                before = cpu_seconds(pid)
                native, lazy = alternate(lambda: walk_stat(plain_tree),
                                         lambda m=mnt: walk_stat(m), runs=5)
                rows.append((f"[{arm}, round {round_number + 1}] walk+lstat "
                             f"{files + files // 100} entries, warm (s)", f"{lazy:.3f}",
                             f"{native:.3f} (plain dir)", f"{native / lazy:.2f}"))
                rows.append((f"[{arm}, round {round_number + 1}] mount CPU over 5 warm walks (s)",
                             f"{cpu_seconds(pid) - before:.2f}", "", ""))
    LAZYSNAP = ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--rss-entries", type=int, default=100_000)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--only-scrape", action="store_true",
                        help="measure only the cost of /metrics scrapes on cold reads")
    parser.add_argument("--scrape-pairs", type=int, default=5)
    parser.add_argument("--only-memory", action="store_true",
                        help="measure only the RSS with --rss-entries entries attached")
    parser.add_argument("--only-passthrough", action="store_true",
                        help="measure only the warm reads with and without FUSE passthrough")
    parser.add_argument("--only-warm", action="store_true",
                        help="measure only warm reads and warm walks (see --base-lazysnap)")
    parser.add_argument("--base-lazysnap", type=Path, default=None,
                        help="with --only-warm: another tree's .venv/bin/lazysnap, mounted in "
                             "turn with this tree's")
    parser.add_argument("--serve", nargs=4, metavar=("BLOB", "MNT", "CACHE", "on|off"),
                        help=argparse.SUPPRESS)  # the mount of a passthrough arm
    args = parser.parse_args()
    if args.serve is not None:
        blob, mnt, cache, passthrough = args.serve
        return serve_blob(Path(blob), Path(mnt), Path(cache), passthrough == "on")
    if os.geteuid() != 0:
        print("needs root (FUSE mounts with allow_other)", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="lazysnap-bench-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.only_warm:
            warm_arms(work, args.big_mib, args.files, args.base_lazysnap, rows)
        elif args.only_passthrough:
            passthrough_arms(work, args.big_mib, rows)
        elif args.only_memory:
            memory(work, args.rss_entries, rows)
        else:
            if not args.only_scrape:
                big_file(work, args.big_mib, rows)
                many_files(work, args.files, rows)
                memory(work, args.rss_entries, rows)
                lazy_start(work, rows)
                passthrough_arms(work, args.big_mib, rows)
            scrape_overhead(work, args.big_mib, rows, pairs=args.scrape_pairs)
    header = ("measurement", "lazysnap", "baseline", "ratio (>1: lazysnap faster)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
