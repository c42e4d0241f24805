"""Run Debian's containerd 1.6 with a private root/state/socket and lazysnap as a proxy plugin.

The CRI plugin is off unless a test asks for it with ``CriSettings``."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class CriSettings:
    """containerd 1.6's CRI plugin as Kubernetes nodes run it with lazysnap."""

    sandbox_image: str  # the pause image, pulled by RunPodSandbox
    snapshotter: str = "lazysnap"
    # False is what lazy pulling needs: CRI then labels each layer's Prepare with cri.*.
    disable_snapshot_annotations: bool = False


CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its objects in


def _cri_toml(workdir: Path, cri: CriSettings) -> str:
    # The stream server (exec/attach/port-forward URLs) listens on a free port: a fixed one
    # would clash with other containerds on the machine. CNI paths are private to the test:
    # host-network pods never call CNI, but the plugin watches conf_dir (and creates it).
    # config_path is a hosts.toml tree, as for lazysnap, so the loopback registry is plain HTTP.
    # restrict_oom_score_adj: CRI gives sandboxes oom_score_adj -998, which needs a privilege
    # that test machines (VMs, containers) may deny even to root; runc then fails with "can't
    # get final child's PID from pipe". Clamped to containerd's own score, as kind nodes do.
    annotations_off = "true" if cri.disable_snapshot_annotations else "false"
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{cri.sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{cri.snapshotter}"
    disable_snapshot_annotations = {annotations_off}
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{workdir}/cni/bin"
    conf_dir = "{workdir}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{workdir}/certs.d"
"""


def config_toml(
    workdir: Path,
    proxy_address: Path,
    *,
    plugin: str = "lazysnap",
    extra_proxy_plugins: Mapping[str, Path] | None = None,
    cri: CriSettings | None = None,
) -> str:
    """``extra_proxy_plugins``: more snapshotters, by name -> socket (e.g. stargz-snapshotter).
    ``cri``: enable and configure the CRI plugin (off otherwise)."""
    extra = "".join(
        f"""
[proxy_plugins.{name}]
  type = "snapshot"
  address = "{address}"
"""
        for name, address in (extra_proxy_plugins or {}).items()
    )
    disabled = "[]" if cri else '["io.containerd.grpc.v1.cri"]'
    return f"""version = 2
root = "{workdir}/root"
state = "{workdir}/state"
disabled_plugins = {disabled}

[grpc]
  address = "{workdir}/c.sock"

[ttrpc]
  address = "{workdir}/c.sock.ttrpc"

[debug]
  address = "{workdir}/d.sock"

[proxy_plugins.{plugin}]
  type = "snapshot"
  address = "{proxy_address}"
{extra}{_cri_toml(workdir, cri) if cri else ""}"""


@contextlib.contextmanager
def run_containerd(
    workdir: Path,
    proxy_address: Path,
    *,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
    extra_proxy_plugins: Mapping[str, Path] | None = None,
    cri: CriSettings | None = None,
) -> Iterator[RunningContainerd]:
    """``workdir`` must be short: unix socket paths are limited to 108 bytes.
    ``extra_proxy_plugins`` registers more snapshotters besides lazysnap (name -> socket).
    ``cri`` turns the CRI plugin on; its hosts.toml tree is ``workdir/certs.d``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "certs.d").mkdir(exist_ok=True)
    config = workdir / "config.toml"
    config.write_text(
        config_toml(workdir, proxy_address, extra_proxy_plugins=extra_proxy_plugins, cri=cri)
    )
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
    # Every namespace: the CRI plugin's pods live in k8s.io, not in the tests' namespace.
    namespaces = running.ctr("namespaces", "ls", "-q", check=False, timeout=20).stdout.split()
    for namespace in namespaces or [running.namespace]:
        in_namespace = replace(running, namespace=namespace)
        tasks = in_namespace.ctr("tasks", "ls", "-q", check=False, timeout=20).stdout.split()
        for task in tasks:
            in_namespace.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=20)
            in_namespace.ctr("tasks", "rm", "-f", task, check=False, timeout=20)
