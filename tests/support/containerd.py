"""Run Debian's containerd 1.6 with a private root/state/socket and lazysnap as a proxy plugin."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def containerd_available() -> bool:
    return all(shutil.which(b) for b in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"))


@dataclass
class RunningContainerd:
    address: Path
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    namespace: str = "lazysnap-test"

    def ctr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}\n"
                f"--- containerd log tail ---\n{self.log()[-3000:]}"
            )
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def config_toml(
    workdir: Path,
    proxy_address: Path,
    *,
    plugin: str = "lazysnap",
    extra_proxy_plugins: Mapping[str, Path] | None = None,
) -> str:
    """``extra_proxy_plugins``: more snapshotters, by name -> socket (e.g. stargz-snapshotter)."""
    extra = "".join(
        f"""
[proxy_plugins.{name}]
  type = "snapshot"
  address = "{address}"
"""
        for name, address in (extra_proxy_plugins or {}).items()
    )
    return f"""version = 2
root = "{workdir}/root"
state = "{workdir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{workdir}/c.sock"

[ttrpc]
  address = "{workdir}/c.sock.ttrpc"

[debug]
  address = "{workdir}/d.sock"

[proxy_plugins.{plugin}]
  type = "snapshot"
  address = "{proxy_address}"
{extra}"""


@contextlib.contextmanager
def run_containerd(
    workdir: Path,
    proxy_address: Path,
    *,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
    extra_proxy_plugins: Mapping[str, Path] | None = None,
) -> Iterator[RunningContainerd]:
    """``workdir`` must be short: unix socket paths are limited to 108 bytes.
    ``extra_proxy_plugins`` registers more snapshotters besides lazysnap (name -> socket)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.toml"
    config.write_text(config_toml(workdir, proxy_address, extra_proxy_plugins=extra_proxy_plugins))
    log_path = workdir / "containerd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["containerd", "--config", str(config), *extra_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
    running = RunningContainerd(workdir / "c.sock", workdir, log_path, process)
    try:
        _wait_ready(running, timeout)
        yield running
    finally:
        _stop_tasks(running)
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Shims outlive containerd on purpose; ours must not outlive the test.
        subprocess.run(["pkill", "-f", f"containerd-shim-runc-v2 .*-address {running.address}"],
                       check=False)
        subprocess.run(["umount", "-R", "-l", str(workdir / "state")], check=False,
                       capture_output=True)


def _wait_ready(running: RunningContainerd, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise RuntimeError(f"containerd exited early:\n{running.log()[-3000:]}")
        if running.address.exists():
            probe = subprocess.run(
                ["ctr", "--address", str(running.address), "version"],
                capture_output=True, timeout=10, check=False,
            )
            if probe.returncode == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"containerd not ready in {timeout}s:\n{running.log()[-3000:]}")


def _stop_tasks(running: RunningContainerd) -> None:
    if running.process.poll() is not None:
        return
    tasks = running.ctr("tasks", "ls", "-q", check=False, timeout=20).stdout.split()
    for task in tasks:
        running.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=20)
        running.ctr("tasks", "rm", "-f", task, check=False, timeout=20)
