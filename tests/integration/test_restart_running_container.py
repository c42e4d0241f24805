"""A running container outlives a kill -9 of the daemon: real containerd 1.6 + runc, the
docker-registry on loopback and the lazysnap daemon.

The fuse keeper holds the FUSE connection while no daemon runs; the restarted daemon takes it
over, so files the container never read before still read right, and a read issued while the
daemon is down waits and then completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapshotter.daemon import keeper as fuse_keeper
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.marks import full_stack

pytestmark = full_stack()

_RNG = random.Random(5)
FILES = {name: _RNG.randbytes(300_000) for name in ("first", "second", "third", "fourth")}
FILES["big"] = _RNG.randbytes(2 << 20)  # over FUSE passthrough's 1 MiB minimum


@pytest.fixture(scope="module")
def image(docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """busybox, then /data/<name> files, both layers eStargz."""
    data = oci.TarBuilder().dir("data")
    for name, content in FILES.items():
        data.file(f"data/{name}", content)
    layers = (
        oci.seekable_layer(oci.busybox_tar(), "estargz"),
        oci.seekable_layer(data.tar(), "estargz"),
    )
    layout = tmp_path_factory.mktemp("restart-layout")
    oci.write_layout(layout, layers)
    reference = f"{docker_registry.host}/restart/app:esgz"
    oci.push_layout(layout, "latest", reference)
    return reference


@contextmanager
def _stack(
    short_tmp: Path, *, keep_mounted: bool, passthrough: bool = False
) -> Iterator[tuple[Daemon, RunningContainerd]]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    config = short_tmp / "lazysnap.toml"
    # Files arrive only when read.
    config.write_text(
        "[lazy]\nbackground_fetch = false\n"
        f"keep_mounted_on_stop = {'true' if keep_mounted else 'false'}\n"
        f'[metrics]\naddress = "unix:{short_tmp / "metrics.sock"}"\n'
        + ('[fuse]\npassthrough = "auto"\n' if passthrough else "")
    )
    try:
        with running_daemon(short_tmp / "d", extra_args=["--config", str(config)]) as daemon, \
                run_containerd(short_tmp / "c", daemon.address) as containerd:
            yield daemon, containerd
    finally:
        # No keeper may outlive the test, whatever state it ended in.
        fuse_keeper.retire(fuse_keeper.keeper_socket(short_tmp / "d" / "root"))


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    with _stack(short_tmp, keep_mounted=False) as parts:
        yield parts


@pytest.fixture
def kept_stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    with _stack(short_tmp, keep_mounted=True) as parts:
        yield parts


@pytest.fixture
def passthrough_stack(short_tmp: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    with _stack(short_tmp, keep_mounted=True, passthrough=True) as parts:
        yield parts


def _pull(containerd: RunningContainerd, reference: str) -> None:
    hosts_dir = containerd.workdir / "certs.d"  # empty: loopback registries get plain HTTP
    hosts_dir.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "pull", reference,
         "--address", str(containerd.address), "--namespace", containerd.namespace,
         "--hosts-dir", str(hosts_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    outcomes = [line.split()[3] for line in result.stdout.splitlines() if line.startswith("layer ")]
    assert outcomes == ["remote", "remote"], result.stdout


def _sha(containerd: RunningContainerd, container: str, exec_id: str, path: str) -> str:
    out = containerd.ctr("task", "exec", "--exec-id", exec_id, container, "/bin/sha256sum",
                         path, timeout=60).stdout
    return out.split()[0]


def _expected(name: str) -> str:
    return hashlib.sha256(FILES[name]).hexdigest()


def _fuse_mounted(daemon: Daemon) -> bool:
    fuse = str(daemon.root / "fuse")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == fuse for line in mounts)


def _events(daemon: Daemon, event: str) -> list[dict[str, object]]:
    """The daemon's JSON log lines with that ``event``."""
    lines = (line for line in daemon.log().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def _metric(daemon: Daemon, name: str) -> float:
    """A sample of the daemon's /metrics, read over its unix socket."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(daemon.root.parent.parent / "metrics.sock"))
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    text = answer.partition(b"\r\n\r\n")[2].decode()
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples if sample.name == name]
    assert len(values) == 1, (name, values)
    return values[0]


def test_a_running_container_reads_new_files_after_the_daemon_is_killed_and_restarted(
    stack: tuple[Daemon, RunningContainerd], image: str
) -> None:
    daemon, containerd = stack
    _pull(containerd, image)
    containerd.ctr("run", "-d", "--snapshotter", "lazysnap", image, "app",
                   "/bin/sleep", "3600", timeout=120)
    assert _sha(containerd, "app", "e1", "/data/first") == _expected("first")

    daemon.kill9()
    assert _fuse_mounted(daemon), "the keeper keeps the connection and so the mount"
    # A read while no daemon runs waits in the kernel (exec itself needs no snapshotter).
    waiting = subprocess.Popen(
        ["ctr", "--address", str(containerd.address), "--namespace", containerd.namespace,
         "task", "exec", "--exec-id", "e2", "app", "/bin/sha256sum", "/data/second"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(2)
        assert waiting.poll() is None, waiting.communicate()
        daemon.start()
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, err
    assert out.split()[0] == _expected("second")
    assert "fuse connection taken over from the keeper" in daemon.log()
    assert _events(daemon, "fuse_takeover")
    assert _metric(daemon, "lazysnap_fuse_takeovers_total") == 1

    # Never read before, read after the restart.
    assert _sha(containerd, "app", "e3", "/data/third") == _expected("third")
    assert _sha(containerd, "app", "e4", "/data/first") == _expected("first")

    # A second crash, and new containers still start on the taken-over mount.
    daemon.kill9()
    daemon.start()
    assert _sha(containerd, "app", "e5", "/data/fourth") == _expected("fourth")
    ok = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", image, "second",
                        "/bin/cat", "/etc/passwd", timeout=120, check=False)
    if ok.returncode != 0:  # containerd may still be redialling the restarted proxy
        time.sleep(3)
        ok = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", image, "second",
                            "/bin/cat", "/etc/passwd", timeout=120)
    assert ok.stdout == "root:x:0:0:root:/root:/bin/sh\n"

    # A clean stop unmounts and lets the keeper go, even under a running container (whose
    # overlay keeps the filesystem alive privately): nothing is left behind.
    keeper = fuse_keeper.keeper_socket(daemon.root)
    assert keeper.exists()
    assert daemon.stop() == 0
    assert not _fuse_mounted(daemon)
    deadline = time.monotonic() + 10
    while keeper.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not keeper.exists(), "the keeper exited"


def test_a_running_container_reads_new_files_across_a_clean_restart_when_kept_mounted(
    kept_stack: tuple[Daemon, RunningContainerd], image: str
) -> None:
    daemon, containerd = kept_stack
    _pull(containerd, image)
    containerd.ctr("run", "-d", "--snapshotter", "lazysnap", image, "app",
                   "/bin/sleep", "3600", timeout=120)
    assert _sha(containerd, "app", "e1", "/data/first") == _expected("first")

    assert daemon.stop(leave_mount=True) == 0  # SIGTERM, as systemctl restart does
    assert "fuse connection left to the keeper for the next daemon" in daemon.log()
    assert _fuse_mounted(daemon), "the keeper keeps the connection and so the mount"
    daemon.start()
    assert "fuse connection taken over from the keeper" in daemon.log()
    assert _sha(containerd, "app", "e2", "/data/second") == _expected("second")
    assert _sha(containerd, "app", "e3", "/data/first") == _expected("first")


def test_a_file_held_open_in_passthrough_opens_again_after_a_clean_restart(
    passthrough_stack: tuple[Daemon, RunningContainerd], image: str
) -> None:
    """With ``[fuse] passthrough = "auto"``: the kernel refuses a page-cache open of a file open
    in passthrough mode (EIO), so the restarted daemon goes on from the backing ids and open
    counts its predecessor left with the keeper."""
    daemon, containerd = passthrough_stack
    if "passthrough=on" not in daemon.log():
        pytest.skip("the kernel did not offer FUSE passthrough at INIT (Linux >= 6.9 with "
                    "CONFIG_FUSE_PASSTHROUGH)")
    _pull(containerd, image)
    containerd.ctr("run", "-d", "--snapshotter", "lazysnap", image, "app",
                   "/bin/sleep", "3600", timeout=120)
    # Read on the FUSE mount itself first (a container's closes reach the daemon some time
    # after its process exits, through overlayfs, and a page-cache open left would keep the
    # file from passthrough): again until an open finds the file whole and copies it, then
    # held open, in passthrough mode, across the restart.
    (big,) = (daemon.root / "fuse").glob("*/data/big")
    deadline = time.monotonic() + 60
    while not _events(daemon, "fuse_passthrough_backing"):
        assert big.read_bytes() == FILES["big"]
        assert time.monotonic() < deadline, "no backing copy was registered"
        time.sleep(0.2)
    held = os.open(big, os.O_RDONLY)
    try:
        assert daemon.stop(leave_mount=True) == 0  # SIGTERM, as systemctl restart does
        (left,) = _events(daemon, "fuse_passthrough_left")
        assert left["backing_files"] == 1 and left["passthrough_open_files"] == 1, left
        assert [e["noted"] for e in _events(daemon, "fuse_passthrough_noted")] == [True]
        daemon.start()
        assert "fuse connection taken over from the keeper" in daemon.log()
        assert _events(daemon, "fuse_passthrough_adopted")
        # Before: EIO, until the held file was closed.
        assert _sha(containerd, "app", "after", "/data/big") == _expected("big")
        assert big.read_bytes() == FILES["big"]
        assert os.pread(held, 4096, 1 << 20) == FILES["big"][1 << 20 : (1 << 20) + 4096]
    finally:
        os.close(held)
    assert _sha(containerd, "app", "other", "/data/second") == _expected("second")
