"""Soak: containers read two lazy images through one daemon while the registry misbehaves.

One eStargz image is served through the fault proxy, which switches fault every half second
(stalls, resets, wrong bytes, ``200`` to a Range, truncation, slow bodies, 503s); the other
comes straight from the registry. The daemon is killed with SIGKILL half way and restarted; the
fuse keeper holds the FUSE connection meanwhile. Reader threads read every file of both
containers' overlay mounts again and again.

Asserted: no read ever returns a wrong byte, every read returns or fails within the read
deadline plus the restart, the healthy image never fails, and the daemon's RSS stays bounded.
``LAZYSNAP_SOAK_SECONDS`` sets the length (60 s by default; e.g. 600 for a long run).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fusefs import FetchConfig
from snapshotter.daemon import keeper as fuse_keeper
from tests.integration.registry_support import fault_proxy as fp
from tests.integration.test_remote_snapshots import (
    LazyImage,
    _chain_ids,
    _expect_remote,
    _mount,
    _prepare,
)
from tests.support import oci_image as oci
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry

SOAK_SECONDS = float(os.environ.get("LAZYSNAP_SOAK_SECONDS", "60"))

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.registry,
    pytest.mark.slow,
    # pytest's default limit would cut a long soak short; setup and teardown need minutes.
    pytest.mark.timeout(int(SOAK_SECONDS) + 240),
]
# The soak's config leaves ``[lazy] read_deadline`` unset, so the default applies.
READ_DEADLINE = FetchConfig().read_deadline
# A read issued while no daemon runs waits in the keeper until the next one has started.
RESTART_ALLOWANCE = 20.0
LATENCY_BOUND = READ_DEADLINE + RESTART_ALLOWANCE + 10.0
# Chunks live on disk; the daemon holds in memory only its code, the layers' metadata and
# the chunks in flight, which the per-host and per-blob limits bound. About 100 MiB is
# what it uses; 300 MiB leaves room for a slow machine's garbage but not for a leak over a
# soak's thousands of fetches.
RSS_BOUND = 300 << 20
# Far smaller than the images, so evicted chunks are fetched again and again under faults.
CACHE_CAPACITY = 512 << 10
PHASE_SECONDS = 0.5
READ_SIZE = 128 << 10

_RNG = random.Random(16)
FAULTY_FILES = {f"data/f{i}": _RNG.randbytes(size)
                for i, size in enumerate((1, 4096, 70_000, 300_000, 700_000, 1_100_000))}
HEALTHY_FILES = {f"data/h{i}": _RNG.randbytes(size)
                 for i, size in enumerate((10, 90_000, 400_000, 800_000))}

FAULTS: tuple[Callable[[], fp.Fault], ...] = (
    lambda: fp.stall(2.0),
    fp.reset,
    lambda: fp.garbage(match=fp.blob_gets),
    fp.full,
    fp.truncate,
    lambda: fp.slow(chunk=2048, delay=0.01),
    lambda: fp.status(503),
)


def _push(registry: RunningRegistry, tmp: Path, name: str, files: dict[str, bytes]) -> LazyImage:
    builder = oci.TarBuilder().dir("data")
    for path, content in files.items():
        builder.file(path, content)
    tar = builder.tar()
    layer = oci.seekable_layer(tar, "estargz", chunk_size=64 << 10)
    layout = tmp / name
    layout.mkdir()
    digest = oci.write_layout(layout, (layer,))
    reference = f"{registry.host}/soak/{name}:latest"
    oci.push_layout(layout, "latest", reference)
    return LazyImage(reference, digest, (layer,), _chain_ids([layer.diff_id]), (tar,))


@dataclass
class Tally:
    ok: int = 0
    faulty_ok: int = 0
    eio: int = 0
    eintr: int = 0
    short: int = 0
    wrong: list[str] = field(default_factory=list)
    healthy_failures: list[str] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    max_latency: float = 0.0
    max_rss: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _read_file(path: Path, expected: bytes, healthy: bool, tally: Tally) -> None:
    """Read in pieces, each checked and timed on its own; then drop the file's page cache so
    the next pass goes to the daemon again."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        _failed(path, exc, healthy, tally)
        return
    try:
        offset = 0
        while offset < len(expected):
            started = time.monotonic()
            try:
                data = os.pread(fd, READ_SIZE, offset)
            except OSError as exc:
                _timed(tally, time.monotonic() - started)
                _failed(path, exc, healthy, tally)
                return
            _timed(tally, time.monotonic() - started)
            want = expected[offset : offset + READ_SIZE]
            # A read may stop short when the kernel's readahead got some pages and an error
            # for the next ones; the next read then meets the error. A short read is fine,
            # an early end of file or a wrong byte is not.
            if not data or data != want[: len(data)]:
                with tally.lock:
                    tally.wrong.append(f"{path}@{offset}: {len(data)} bytes differ or end early")
                return
            with tally.lock:
                tally.ok += 1
                tally.faulty_ok += not healthy
                tally.short += len(data) < len(want)
            offset += len(data)
    finally:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _timed(tally: Tally, seconds: float) -> None:
    with tally.lock:
        tally.max_latency = max(tally.max_latency, seconds)


def _failed(path: Path, exc: OSError, healthy: bool, tally: Tally) -> None:
    with tally.lock:
        if healthy:
            tally.healthy_failures.append(f"{path}: {exc}")
        elif exc.errno == errno.EIO:
            tally.eio += 1
        elif exc.errno == errno.EINTR:
            tally.eintr += 1
        else:
            tally.other_errors.append(f"{path}: {exc}")


def _reader(seed: int, files: list[tuple[Path, bytes, bool]], stop: threading.Event,
            tally: Tally) -> None:
    order = random.Random(seed)
    while not stop.is_set():
        for path, expected, healthy in order.sample(files, len(files)):
            if stop.is_set():
                return
            _read_file(path, expected, healthy, tally)


def _cycle_faults(proxy: fp.FaultProxy, stop: threading.Event) -> None:
    while not stop.is_set():
        # The fault met least often so far comes next: a slow machine that makes few requests
        # in a phase still meets every kind of fault.
        with proxy.lock:
            met = list(proxy.applied)
        make = min(FAULTS, key=lambda fault: met.count(fault().kind))
        proxy.clear()
        # Many copies: every blob GET of the phase meets the fault, however many there are.
        proxy.inject(*(make() for _ in range(50)))
        stop.wait(PHASE_SECONDS)
    proxy.clear()


def _sample_rss(daemon: Daemon, stop: threading.Event, tally: Tally) -> None:
    while not stop.wait(0.2):
        process = daemon.process
        if process is None:
            continue
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue  # between the kill and the restart
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                with tally.lock:
                    tally.max_rss = max(tally.max_rss, int(line.split()[1]) * 1024)


@pytest.fixture
def mounted(short_tmp: Path) -> Iterator[list[Path]]:
    targets: list[Path] = []
    yield targets
    for target in reversed(targets):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_soak_faulty_registry_and_restart_never_serve_wrong_bytes(
    short_tmp: Path, docker_registry: RunningRegistry, mounted: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    layouts = tmp_path_factory.mktemp("soak-layouts")
    faulty = _push(docker_registry, layouts, "faulty", FAULTY_FILES)
    healthy = _push(docker_registry, layouts, "healthy", HEALTHY_FILES)
    config = short_tmp / "lazysnap.toml"
    config.write_text(f"[lazy]\nbackground_fetch = false\ncache_capacity = {CACHE_CAPACITY}\n")
    root = short_tmp / "d" / "root"
    try:
        with fp.run_fault_proxy(docker_registry.host) as proxy, \
                running_daemon(short_tmp / "d", extra_args=["--config", str(config)]) as daemon:
            faulty = LazyImage(faulty.reference.replace(docker_registry.host, proxy.host, 1),
                               faulty.manifest_digest, faulty.layers, faulty.chain,
                               faulty.plain_tars)
            _expect_remote(daemon, faulty, 0, "")
            _expect_remote(daemon, healthy, 0, "")
            files: list[tuple[Path, bytes, bool]] = []
            for name, image, contents in (("faulty", faulty, FAULTY_FILES),
                                          ("healthy", healthy, HEALTHY_FILES)):
                target = short_tmp / name
                _mount(_prepare(daemon, f"container-{name}", image.chain[0], {}), target, mounted)
                files += [(target / path, data, name == "healthy")
                          for path, data in contents.items()]
            tally = Tally()
            requests_before = proxy.requests
            stop = threading.Event()
            # Healthy and faulty files have readers of their own, so a read waiting out a
            # fault never holds up the healthy image's reads.
            threads = [
                threading.Thread(target=_reader, args=(seed, group, stop, tally))
                for seed, group in enumerate([[f for f in files if f[2]],
                                              [f for f in files if not f[2]]] * 2)
            ]
            threads.append(threading.Thread(target=_cycle_faults, args=(proxy, stop)))
            threads.append(threading.Thread(target=_sample_rss, args=(daemon, stop, tally)))
            for thread in threads:
                thread.start()
            try:
                time.sleep(SOAK_SECONDS / 2)
                daemon.kill9()
                daemon.start()
                time.sleep(SOAK_SECONDS / 2)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=LATENCY_BOUND + 10)
            assert not any(thread.is_alive() for thread in threads), "a read never returned"
            applied = set(proxy.applied)
            print(
                f"soak {SOAK_SECONDS:.0f}s: reads ok={tally.ok} (faulty image {tally.faulty_ok}) eio={tally.eio} "
                f"eintr={tally.eintr} short={tally.short} wrong={len(tally.wrong)} "
                f"healthy_failures={len(tally.healthy_failures)} "
                f"max_latency={tally.max_latency:.2f}s max_rss={tally.max_rss >> 20}MiB "
                f"proxy_requests={proxy.requests - requests_before} faults={sorted(applied)}"
            )
            assert tally.wrong == [], tally.wrong[:10]
            assert tally.healthy_failures == [], tally.healthy_failures[:10]
            assert tally.other_errors == [], tally.other_errors[:10]
            assert tally.max_latency <= LATENCY_BOUND
            assert 0 < tally.max_rss <= RSS_BOUND
            assert "fuse connection taken over" in daemon.log()
            # The soak is worth something only if the faults met the daemon's fetches.
            assert applied == {"stall", "reset", "garbage", "full", "truncate", "slow", "status"}
            assert tally.faulty_ok > 0 and tally.ok > tally.faulty_ok
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(root))
