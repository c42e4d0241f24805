"""The CRI arms of benchmarks/startup.py: a container started the way kubelet starts one.

PullImage, RunPodSandbox (host network: no CNI plugin needed), CreateContainer and
StartContainer through containerd's CRI plugin, then the first line of the container's CRI log
file. No ``lazysnap pull`` runs: the CRI plugin's own pull hands the layers' ``cri.*`` labels
to the snapshotter, which is all a lazy snapshotter gets on a Kubernetes node.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from snapshotter.client.chain import chain_ids  # noqa: E402
from snapshotter.labels import REMOTE, REMOTE_VALUE  # noqa: E402
from tests.support import oci_image as oci  # noqa: E402
from tests.support.containerd import CRI_NAMESPACE, RunningContainerd  # noqa: E402
from tests.support.cri import CriClient, running_pod  # noqa: E402

PAUSE_REPOSITORY = "bench/pause"
CONTAINER = "bench"
LOG_POLL = 0.005  # seconds between looks at the container's log file


def push_pause_image(layout: Path, registry_host: str) -> str:
    """The sandbox image: busybox's sleep standing in for the pause binary. Pushed to the
    registry itself, not through the link proxy, and pulled before the clock starts: a node
    has its pause image already."""
    builder = oci.TarBuilder().dir("bin")
    builder.file("bin/busybox", oci.BUSYBOX.read_bytes(), 0o755)
    pause_tar = builder.symlink("bin/sleep", "busybox").tar()
    oci.write_layout(layout, [oci.gzip_layer(pause_tar)], cmd=("/bin/sleep", "1000000000"))
    reference = f"{registry_host}/{PAUSE_REPOSITORY}:latest"
    oci.push_layout(layout, "latest", reference)
    return reference


def diff_ids(layout: Path) -> list[str]:
    """The image's layer diff IDs, from the config its layout's one manifest names."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].removeprefix("sha256:"))
                          .read_text())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:"))
                        .read_text())
    return list(config["rootfs"]["diff_ids"])


def remote_layers(containerd: RunningContainerd, snapshotter: str, layout: Path) -> int:
    """How many of the image's layers the CRI pull left as remote (lazy) snapshots."""
    remote = 0
    for chain_id in chain_ids(diff_ids(layout)):
        done = containerd.ctr("--namespace", CRI_NAMESPACE, "snapshots", "--snapshotter",
                              snapshotter, "info", chain_id, check=False)
        if done.returncode == 0:
            labels = json.loads(done.stdout).get("Labels") or {}
            remote += labels.get(REMOTE) == REMOTE_VALUE
    return remote


@dataclass
class CriStart:
    pull_s: float = 0.0
    first_output_s: float = 0.0
    exit_s: float = 0.0
    first_line: str = ""
    exit_code: int = -1
    image_id: str = ""


def first_log_line(path: Path, deadline: float, poll: float = LOG_POLL) -> str:
    """The message of the first complete line of a CRI log file (``<time> <stream> <tag>
    <message>``), polled every ``poll`` seconds until it is there or ``deadline`` (monotonic)
    passes."""
    while time.monotonic() < deadline:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if "\n" in text:
            fields = text.split("\n", 1)[0].split(" ", 3)
            return fields[3] if len(fields) == 4 else ""
        time.sleep(poll)
    raise TimeoutError(f"no line in {path} in time")


def start_through_cri(client: CriClient, reference: str, command: list[str], pods: Path,
                      pod_name: str, started: float, timeout: float,
                      on_first_output: Callable[[], None]) -> CriStart:
    """PullImage -> RunPodSandbox -> CreateContainer -> StartContainer -> first log line, timed
    from ``started`` (``on_first_output`` is called right then); then waits for the container
    to exit and removes the pod."""
    image_id = client.pull(reference)
    pull_s = time.monotonic() - started
    times = start_pod_through_cri(client, reference, command, pods, pod_name, started, timeout,
                                  on_first_output)
    times.image_id, times.pull_s = image_id, pull_s
    return times


def start_pod_through_cri(client: CriClient, reference: str, command: list[str], pods: Path,
                          pod_name: str, started: float, timeout: float,
                          on_first_output: Callable[[], None] = lambda: None,
                          poll: float = LOG_POLL) -> CriStart:
    """A pulled image's pod: RunPodSandbox -> CreateContainer -> StartContainer -> first log
    line (polled every ``poll`` seconds), timed from ``started``; then waits for the container
    to exit and removes the pod. ``pull_s`` and ``image_id`` are left unset."""
    times = CriStart()
    log_directory = pods / pod_name
    with running_pod(client, pod_name, log_directory) as pod:
        container = pod.start_container(CONTAINER, reference, command)
        times.first_line = first_log_line(log_directory / f"{CONTAINER}.log",
                                          started + timeout, poll)
        times.first_output_s = time.monotonic() - started
        on_first_output()
        status = pod.wait_exited(container, timeout=timeout)
        times.exit_s = time.monotonic() - started
        times.exit_code = int(status.exit_code)
        pod.stop_and_remove_container(container)
    return times
