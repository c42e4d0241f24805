"""Run ``lazysnap serve`` as a real subprocess and talk to it over its socket."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc, snapshots_pb2_grpc

LAZYSNAP = [sys.executable, "-m", "snapshotter.cli"]


@dataclass
class Daemon:
    root: Path
    address: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*LAZYSNAP, "serve", "--root", str(self.root), "--address", str(self.address),
             "--log-level", "debug", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lazysnap exited early:\n{self.log()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"lazysnap not ready in {timeout}s:\n{self.log()[-3000:]}")

    def healthy(self) -> bool:
        if not self.address.exists():
            return False
        try:
            with grpc.insecure_channel(f"unix:{self.address}") as channel:
                daemon_pb2_grpc.DaemonStub(channel).Status(daemon_pb2.StatusRequest(), timeout=2)
        except grpc.RpcError:
            return False
        return True

    def stop(self, timeout: float = 20.0, *, leave_mount: bool = False) -> int:
        """SIGTERM and wait; then unmount what the daemon left, unless ``leave_mount`` (a
        daemon configured to leave its FUSE connection to the keeper for the next one)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        if not leave_mount:
            self.unmount_leftovers()
        return code

    def unmount_leftovers(self) -> None:
        """A daemon that died uncleanly leaves its FUSE mount; no test may leave one behind."""
        fuse = str(self.root / "fuse")
        with open("/proc/self/mounts") as mounts:
            mounted = any(line.split()[1] == fuse for line in mounts)
        if mounted:
            subprocess.run(["fusermount3", "-u", "-z", fuse], check=False, capture_output=True)

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def listed_layers(self, count: int, timeout: float = 30.0) -> list[Path]:
        """The layers the FUSE mount's root lists, once ``count`` of them are there. A lazy
        Prepare answers before its layer's index is built, and the root lists a layer only
        once it is (fusefs.pending): a listing right after the Prepare may not show it yet."""
        root = self.root / "fuse"
        deadline = time.monotonic() + timeout
        while True:
            layers = sorted(root.iterdir())
            if len(layers) >= count or time.monotonic() > deadline:
                return layers
            time.sleep(0.05)

    @contextlib.contextmanager
    def snapshots(self) -> Iterator[snapshots_pb2_grpc.SnapshotsStub]:
        with grpc.insecure_channel(f"unix:{self.address}") as channel:
            yield snapshots_pb2_grpc.SnapshotsStub(channel)


@contextlib.contextmanager
def running_daemon(
    workdir: Path, *, extra_args: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(workdir / "root", workdir / "lazysnap.sock", workdir / "lazysnap.log",
                    extra_args=extra_args or [], env=env)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.unmount_leftovers()
