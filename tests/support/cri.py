"""A CRI runtime.v1 client for the tests: what kubelet does, with the project's own stubs.

Pods are host-network (``NamespaceMode.NODE``), so no CNI plugin is needed: containerd's CRI
plugin skips pod networking for them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.support._cri_proto import cri_api_pb2 as cri
from tests.support._cri_proto import cri_api_pb2_grpc as cri_grpc

CALL_TIMEOUT = 120.0  # seconds; a pull of a small image through a lazy snapshotter takes ~1 s


@dataclass
class CriClient:
    runtime: cri_grpc.RuntimeServiceStub
    images: cri_grpc.ImageServiceStub

    def pull(self, reference: str) -> str:
        """PullImage; returns the image ID (``image_ref``)."""
        reply = self.images.PullImage(
            cri.PullImageRequest(image=cri.ImageSpec(image=reference)), timeout=CALL_TIMEOUT
        )
        return str(reply.image_ref)

    def image_status(self, reference: str) -> cri.Image | None:
        reply = self.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=reference)), timeout=CALL_TIMEOUT
        )
        return reply.image if reply.HasField("image") else None

    def remove_image(self, reference: str) -> None:
        self.images.RemoveImage(
            cri.RemoveImageRequest(image=cri.ImageSpec(image=reference)), timeout=CALL_TIMEOUT
        )

    def listed_images(self) -> list[cri.Image]:
        return list(self.images.ListImages(cri.ListImagesRequest(), timeout=CALL_TIMEOUT).images)


@contextlib.contextmanager
def cri_client(address: Path) -> Iterator[CriClient]:
    with grpc.insecure_channel(f"unix:{address}") as channel:
        yield CriClient(cri_grpc.RuntimeServiceStub(channel), cri_grpc.ImageServiceStub(channel))


def host_network_pod(name: str, log_directory: Path) -> cri.PodSandboxConfig:
    """A pod as kubelet describes one with ``hostNetwork: true``."""
    node = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(log_directory),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=node)
        ),
    )


@dataclass
class Pod:
    """A running pod sandbox and the containers created in it."""

    client: CriClient
    sandbox_id: str
    config: cri.PodSandboxConfig

    def create_container(self, name: str, image: str, command: Sequence[str]) -> str:
        """CreateContainer; the log will go to ``<log_directory>/<name>.log``. This is where
        containerd reads the rootfs on the host: the image's USER and VOLUME contents."""
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=image),
            command=list(command),
            log_path=f"{name}.log",
        )
        created = self.client.runtime.CreateContainer(
            cri.CreateContainerRequest(
                pod_sandbox_id=self.sandbox_id, config=config, sandbox_config=self.config
            ),
            timeout=CALL_TIMEOUT,
        )
        return str(created.container_id)

    def start(self, container_id: str) -> None:
        self.client.runtime.StartContainer(
            cri.StartContainerRequest(container_id=container_id), timeout=CALL_TIMEOUT
        )

    def start_container(self, name: str, image: str, command: Sequence[str]) -> str:
        """CreateContainer then StartContainer."""
        container_id = self.create_container(name, image, command)
        self.start(container_id)
        return container_id

    def status(self, container_id: str) -> cri.ContainerStatus:
        reply = self.client.runtime.ContainerStatus(
            cri.ContainerStatusRequest(container_id=container_id), timeout=CALL_TIMEOUT
        )
        status: cri.ContainerStatus = reply.status
        return status

    def wait_exited(self, container_id: str, timeout: float = 60.0) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        status = self.status(container_id)
        while status.state != cri.CONTAINER_EXITED and time.monotonic() < deadline:
            time.sleep(0.1)
            status = self.status(container_id)
        assert status.state == cri.CONTAINER_EXITED, status
        return status

    def exec_sync(self, container_id: str, *cmd: str, timeout: int = 60) -> bytes:
        reply = self.client.runtime.ExecSync(
            cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout),
            timeout=timeout + 30,
        )
        assert reply.exit_code == 0, (cmd, reply.exit_code, reply.stderr)
        stdout: bytes = reply.stdout
        return stdout

    def log_lines(self, name: str) -> list[str]:
        """The messages of the container's CRI log file (``<time> <stream> <tag> <message>``)."""
        path = Path(self.config.log_directory) / f"{name}.log"
        return [line.split(" ", 3)[3] for line in path.read_text().splitlines()]

    def run_to_success(self, name: str, image: str, command: Sequence[str]) -> list[str]:
        """Start a container, check that it exits 0 and remove it: its log messages."""
        container_id = self.start_container(name, image, command)
        status = self.wait_exited(container_id)
        assert status.exit_code == 0, (status, self.log_lines(name))
        lines = self.log_lines(name)
        self.stop_and_remove_container(container_id)
        return lines

    def stop_and_remove_container(self, container_id: str) -> None:
        runtime = self.client.runtime
        runtime.StopContainer(
            cri.StopContainerRequest(container_id=container_id, timeout=0), timeout=CALL_TIMEOUT
        )
        runtime.RemoveContainer(
            cri.RemoveContainerRequest(container_id=container_id), timeout=CALL_TIMEOUT
        )


@contextlib.contextmanager
def running_pod(client: CriClient, name: str, log_directory: Path) -> Iterator[Pod]:
    """RunPodSandbox; on exit StopPodSandbox and RemovePodSandbox (which removes its containers)
    and check the sandbox is gone."""
    log_directory.mkdir(parents=True, exist_ok=True)
    config = host_network_pod(name, log_directory)
    reply = client.runtime.RunPodSandbox(
        cri.RunPodSandboxRequest(config=config), timeout=CALL_TIMEOUT
    )
    pod = Pod(client, str(reply.pod_sandbox_id), config)
    try:
        yield pod
    finally:
        client.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=CALL_TIMEOUT
        )
        client.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=CALL_TIMEOUT
        )
    left = client.runtime.ListPodSandbox(
        cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(id=pod.sandbox_id)),
        timeout=CALL_TIMEOUT,
    )
    assert not left.items, left
