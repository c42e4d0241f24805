"""Private images on the Kubernetes path: a CRI client (as kubelet with a pull secret) pulls
through lazysnap's CRI image service proxy into containerd 1.6's real CRI plugin, and lazysnap
reads the layers lazily with the credentials it captured from ``PullImage.auth`` — also after a
daemon restart. The daemon's own docker config is empty, so nothing else could give them."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from snapshotter.client.chain import chain_ids
from snapshotter.daemon import keeper as fuse_keeper
from snapshotter.labels import REMOTE, REMOTE_VALUE
from tests.integration.registry_support.helpers import write_hosts_toml
from tests.integration.registry_support.htpasswd import write_htpasswd
from tests.integration.registry_support.tls import make_test_ca, openssl_available
from tests.integration.registry_support.token_server import run_token_server
from tests.support import oci_image as oci
from tests.support._cri_proto import cri_api_pb2 as cri
from tests.support._cri_proto import cri_api_pb2_grpc as cri_grpc
from tests.support.containerd import (
    CRI_NAMESPACE,
    CriSettings,
    RunningContainerd,
    containerd_available,
    run_containerd,
)
from tests.support.cri import CALL_TIMEOUT, CriClient, running_pod
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry
from tests.support.marks import full_stack
from tests.support.secret_scan import files_holding

pytestmark = full_stack()

USER, PASSWORD = "kubelet-user", "Cri-Pr0xy-s3cret"
HELLO = b"hello from a private registry\n"
FIRST = random.Random(15).randbytes(300_000)
READ_DATA = ("/bin/sh", "-c", "cat /data/hello && sha256sum /data/first")


@dataclass(frozen=True)
class PrivateImages:
    registry: RunningRegistry
    app: str
    app_diff_ids: tuple[str, ...]
    pause: str


def _push(registry: RunningRegistry, layout: Path, name: str, layers: tuple[oci.Layer, ...],
          cmd: tuple[str, ...]) -> str:
    oci.write_layout(layout, layers, cmd=cmd)
    reference = f"{registry.host}/private/{name}:1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         "--dest-creds", f"{USER}:{PASSWORD}", f"oci:{layout}:latest", f"docker://{reference}"],
        check=True, capture_output=True, timeout=120,
    )
    return reference


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateImages]:
    if not registry_available():
        pytest.skip("Debian's docker-registry is not installed")
    workdir = tmp_path_factory.mktemp("cri-private")
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    auth = {"htpasswd": {"realm": "lazysnap-cri", "path": str(htpasswd)}}
    with run_registry(workdir / "registry", extra_config={"auth": auth}) as registry:
        data = oci.TarBuilder().dir("data").file("data/hello", HELLO).file("data/first", FIRST)
        layers = (oci.seekable_layer(oci.busybox_tar(), "estargz"),
                  oci.seekable_layer(data.tar(), "estargz"))
        app = _push(registry, workdir / "app", "app", layers, ("/bin/sh",))
        pause_tar = oci.TarBuilder().dir("bin").file("bin/busybox", oci.BUSYBOX.read_bytes(),
                                                     0o755).symlink("bin/sleep", "busybox").tar()
        pause = _push(registry, workdir / "pause", "pause", (oci.gzip_layer(pause_tar),),
                      ("/bin/sleep", "1000000000"))
        yield PrivateImages(registry, app, tuple(layer.diff_id for layer in layers), pause)


@dataclass
class ProxyStack:
    daemon: Daemon
    containerd: RunningContainerd
    client: CriClient  # runtime calls to containerd, image calls to the proxy
    proxy: Path
    work: Path

    def k8s(self) -> RunningContainerd:
        return replace(self.containerd, namespace=CRI_NAMESPACE)

    def remote_layers(self, diff_ids: tuple[str, ...]) -> list[bool]:
        found = []
        for chain in chain_ids(diff_ids):
            info = self.k8s().ctr("snapshots", "--snapshotter", "lazysnap", "info", chain).stdout
            found.append(f'"{REMOTE}": "{REMOTE_VALUE}"' in info)
        return found


@contextlib.contextmanager
def _proxy_stack(pause: str, hosts: Callable[[Path], None] | None = None
                 ) -> Iterator[ProxyStack]:
    """``hosts``: writes the hosts.toml tree containerd and lazysnap share (``c/certs.d``)."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    work = Path(tempfile.mkdtemp(prefix="lzp", dir="/tmp"))
    hosts_args: list[str] = []
    if hosts is not None:
        hosts(work / "c" / "certs.d")
        hosts_args = ["--hosts-dir", str(work / "c" / "certs.d")]
    empty_docker_config = work / "docker-config"
    empty_docker_config.mkdir()
    proxy = work / "d" / "cri.sock"
    config = work / "lazysnap.toml"
    config.write_text("[lazy]\nbackground_fetch = false\n"
                      f'[cri]\ncontainerd_address = "{work / "c" / "c.sock"}"\n')
    try:
        with running_daemon(work / "d", extra_args=["--config", str(config),
                                                    "--cri-image-service", str(proxy),
                                                    *hosts_args],
                            env={"DOCKER_CONFIG": str(empty_docker_config)}) as daemon, \
                run_containerd(work / "c", daemon.address,
                               cri=CriSettings(sandbox_image=pause)) as containerd, \
                grpc.insecure_channel(f"unix:{containerd.address}") as runtime, \
                grpc.insecure_channel(f"unix:{proxy}") as images:
            client = CriClient(cri_grpc.RuntimeServiceStub(runtime),
                               cri_grpc.ImageServiceStub(images))
            yield ProxyStack(daemon, containerd, client, proxy, work)
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(work / "d" / "root"))
        shutil.rmtree(work, ignore_errors=True)


def _wait_until_containerd_reconnects(stack: ProxyStack) -> None:
    """containerd redials a restarted snapshotter with gRPC backoff (at most 3 s apart)."""
    deadline = time.monotonic() + 20
    while True:
        probe = stack.k8s().ctr("snapshots", "--snapshotter", "lazysnap", "ls", check=False)
        if probe.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert probe.returncode == 0, probe.stderr


def _read_private_data(stack: ProxyStack, image: str) -> None:
    """A pod whose container prints /data/hello and the sha256 of /data/first."""
    with running_pod(stack.client, "private", stack.work / "pods") as pod:
        lines = pod.run_to_success("reader", image, READ_DATA)
    assert lines == [
        HELLO.decode().rstrip("\n"), f"{hashlib.sha256(FIRST).hexdigest()}  /data/first"
    ]


def _pull(client: CriClient, reference: str, auth: cri.AuthConfig) -> str:
    reply = client.images.PullImage(
        cri.PullImageRequest(image=cri.ImageSpec(image=reference), auth=auth),
        timeout=CALL_TIMEOUT,
    )
    return str(reply.image_ref)


def test_a_private_image_pulled_through_the_proxy_is_lazy_and_read_after_a_restart(
    private: PrivateImages,
) -> None:
    host = private.registry.host
    with _proxy_stack(private.pause) as stack:
        # kubelet's two shapes of a pull secret: username/password and docker's base64 auth.
        _pull(stack.client, private.pause,
              cri.AuthConfig(username=USER, password=PASSWORD, server_address=f"http://{host}"))
        encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        started = time.monotonic()
        image_id = _pull(stack.client, private.app,
                         cri.AuthConfig(auth=encoded, server_address=f"http://{host}/v2/"))
        pull_seconds = time.monotonic() - started
        assert image_id.startswith("sha256:")
        assert stack.remote_layers(private.app_diff_ids) == [True, True], (
            "the captured credentials let lazysnap read the private layers' TOCs"
        )
        status = stack.client.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=private.app)), timeout=CALL_TIMEOUT)
        assert status.image.id == image_id

        saved = stack.daemon.address.parent / "cri-credentials.json"
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        # The files were never read: after the restart every byte comes from the registry,
        # with the credentials the new daemon read back from the saved file.
        stack.daemon.stop()
        stack.daemon.start()
        _wait_until_containerd_reconnects(stack)
        _read_private_data(stack, private.app)
        assert "cri credentials loaded" in stack.daemon.log()

        ps = subprocess.run(["ps", "axww", "-o", "args"], capture_output=True, text=True,
                            check=True).stdout
        leaks = [str(path) for path in files_holding(stack.work / "d" / "root",
                                                      PASSWORD.encode())]
        assert PASSWORD not in stack.daemon.log()
        assert PASSWORD not in ps and encoded not in ps
        assert leaks == [], "no credential under the state root"
        print(f"PullImage of a 2-layer lazy image through the proxy: {pull_seconds:.3f} s; "
              f"one ImageStatus round trip: {_round_trip_ms(stack.containerd.address):.2f} ms "
              f"to containerd, {_round_trip_ms(stack.proxy):.2f} ms through the proxy")


def _round_trip_ms(address: Path) -> float:
    """The median of 50 ImageStatus calls: what the proxy adds to every image call."""
    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = cri_grpc.ImageServiceStub(channel)
        request = cri.ImageStatusRequest(image=cri.ImageSpec(image="absent:1"))
        times = []
        for _ in range(50):
            started = time.perf_counter()
            stub.ImageStatus(request, timeout=10)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1000


def test_a_malformed_pull_reaches_containerd_untouched(private: PrivateImages) -> None:
    with _proxy_stack(private.pause) as stack, \
            grpc.insecure_channel(f"unix:{stack.proxy}") as channel:
        raw = channel.unary_unary("/runtime.v1.ImageService/PullImage", None, None)
        with pytest.raises(grpc.RpcError) as failed:
            raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)
        # containerd's gRPC server is what refuses it; the proxy only logged.
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "unmarshal" in str(failed.value.details())
        assert "cri pull not understood; forwarded as it is" in stack.daemon.log()


def test_with_containerd_down_the_proxy_answers_unavailable_at_once(tmp_path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="lzd", dir="/tmp"))
    proxy = work / "d" / "cri.sock"
    config = work / "lazysnap.toml"
    config.write_text(f'[cri]\ncontainerd_address = "{work / "nothing.sock"}"\n')
    try:
        with running_daemon(work / "d", extra_args=["--config", str(config),
                                                    "--cri-image-service", str(proxy)]), \
                grpc.insecure_channel(f"unix:{proxy}") as channel:
            stub = cri_grpc.ImageServiceStub(channel)
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as failed:
                    stub.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="busybox")),
                                   timeout=60)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 2.0
            assert stat.S_IMODE(proxy.stat().st_mode) == 0o660
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(work / "d" / "root"))
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class RegistryKind:
    images: PrivateImages
    hosts: Callable[[Path], None]  # writes the hosts.toml tree for containerd and lazysnap


@contextlib.contextmanager
def _private_registry(kind: str, workdir: Path) -> Iterator[RegistryKind]:
    """A TLS registry with htpasswd (its CA known through hosts.toml only), or one with token
    auth; both hold the app and pause images of ``private``."""
    if not (registry_available() and openssl_available()):
        pytest.skip("needs Debian's docker-registry and the openssl CLI")
    with contextlib.ExitStack() as stack:
        if kind == "htpasswd-tls":
            ca = make_test_ca(workdir / "pki")
            htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
            registry = stack.enter_context(run_registry(workdir / "registry", scheme="https",
                extra_config={
                    "http": {"tls": {"certificate": str(ca.server_cert),
                                     "key": str(ca.server_key)}},
                    "auth": {"htpasswd": {"realm": "lazysnap-cri", "path": str(htpasswd)}}}))
            # containerd 1.6 refuses a hosts.toml without a [host] table.
            hosts_toml = (f'server = "https://{registry.host}"\nca = "{ca.ca_cert}"\n'
                          f'[host."https://{registry.host}"]\n'
                          f'  capabilities = ["pull", "resolve"]\n  ca = "{ca.ca_cert}"\n')
        else:
            tokens = stack.enter_context(run_token_server(
                workdir / "token", users={USER: PASSWORD}, anonymous_pull=False))
            registry = stack.enter_context(run_registry(
                workdir / "registry", extra_config={"auth": tokens.registry_auth_config()}))
            hosts_toml = f'server = "http://{registry.host}"\n'
        data = oci.TarBuilder().dir("data").file("data/hello", HELLO).file("data/first", FIRST)
        layers = (oci.seekable_layer(oci.busybox_tar(), "estargz"),
                  oci.seekable_layer(data.tar(), "estargz"))
        app = _push(registry, workdir / "app", "app", layers, ("/bin/sh",))
        pause_tar = oci.TarBuilder().dir("bin").file("bin/busybox", oci.BUSYBOX.read_bytes(),
                                                     0o755).symlink("bin/sleep", "busybox").tar()
        pause = _push(registry, workdir / "pause", "pause", (oci.gzip_layer(pause_tar),),
                      ("/bin/sleep", "1000000000"))

        def hosts(tree: Path) -> None:
            write_hosts_toml(tree, registry.host, hosts_toml)

        images = PrivateImages(registry, app, tuple(layer.diff_id for layer in layers), pause)
        yield RegistryKind(images, hosts)


@pytest.mark.parametrize("kind", ["htpasswd-tls", "token"])
def test_tls_and_token_registries_through_the_proxy_and_a_wrong_auth_changes_nothing(
    kind: str, tmp_path: Path
) -> None:
    """Issue 10: the proxy's captured credentials with a TLS registry whose CA only hosts.toml
    names, and with a token server; then a PullImage with a wrong password (containerd fails
    it) must not replace the working set: after a restart the layers still read right."""
    with _private_registry(kind, tmp_path) as kind_registry:
        private = kind_registry.images
        with _proxy_stack(private.pause, kind_registry.hosts) as stack:
            right = cri.AuthConfig(username=USER, password=PASSWORD)
            _pull(stack.client, private.pause, right)
            _pull(stack.client, private.app, right)
            assert stack.remote_layers(private.app_diff_ids) == [True, True]
            wrong = "Wr0ng-Pa55word-from-a-bad-secret"
            with pytest.raises(grpc.RpcError):
                _pull(stack.client, private.app, cri.AuthConfig(username=USER, password=wrong))
            assert "cri pull credentials refused by the registry; the stored ones stay" in (
                stack.daemon.log())
            saved = (stack.daemon.address.parent / "cri-credentials.json").read_text()
            assert wrong not in saved and PASSWORD in saved
            stack.daemon.stop()
            stack.daemon.start()
            _wait_until_containerd_reconnects(stack)
            _read_private_data(stack, private.app)
            log = stack.daemon.log()
            assert PASSWORD not in log and wrong not in log
            assert "lazy read refused" not in log
