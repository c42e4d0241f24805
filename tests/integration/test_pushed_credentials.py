"""Registry credentials reach the daemon over its own socket, never through labels or logs:
a lazy layer in a password-protected registry is served once `lazysnap pull --user` (or the
Daemon/SetCredentials RPC) has handed the daemon the credentials its docker config lacks."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc, snapshots_pb2
from snapshotter.labels import CRI_IMAGE_REF, CRI_LAYER_DIGEST, SNAPSHOT_REF, STARGZ_TOC_DIGEST
from tests.integration.registry_support.htpasswd import write_htpasswd
from tests.support import oci_image as oci
from tests.support.containerd import containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

USER, PASSWORD = "bob", "s3cret-Pa55word"
LAZYSNAP = [".venv/bin/lazysnap"]


@pytest.fixture(scope="module")
def private_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry,
                                                                              str, oci.Layer]]:
    if not registry_available():
        pytest.skip("Debian's docker-registry is not installed")
    workdir = tmp_path_factory.mktemp("private-registry")
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    auth = {"htpasswd": {"realm": "lazysnap-test", "path": str(htpasswd)}}
    with run_registry(workdir, extra_config={"auth": auth}) as registry:
        layer = oci.seekable_layer(oci.busybox_tar(), "estargz")
        oci.write_layout(workdir / "layout", [layer])
        reference = f"{registry.host}/private/busybox:latest"
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             "--dest-creds", f"{USER}:{PASSWORD}", f"oci:{workdir / 'layout'}:latest",
             f"docker://{reference}"],
            check=True, capture_output=True, timeout=120,
        )
        yield registry, reference, layer


def _daemon_without_credentials(workdir: Path) -> AbstractContextManager[Daemon]:
    empty = workdir / "docker-config"
    empty.mkdir(parents=True)
    return running_daemon(workdir / "d", env={"DOCKER_CONFIG": str(empty)})


def _lazy_prepare(daemon: Daemon, key: str, reference: str, layer: oci.Layer) -> grpc.StatusCode:
    labels = {
        SNAPSHOT_REF: layer.diff_id,
        CRI_IMAGE_REF: reference,
        CRI_LAYER_DIGEST: layer.digest,
        STARGZ_TOC_DIGEST: dict(layer.annotations)[STARGZ_TOC_DIGEST],
    }
    with daemon.snapshots() as stub:
        try:
            stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key=key, labels=labels))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK  # an ordinary snapshot: the lazy path fell back


def _set_credentials(daemon: Daemon, **fields: object) -> daemon_pb2.SetCredentialsResponse:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        return daemon_pb2_grpc.DaemonStub(channel).SetCredentials(
            daemon_pb2.SetCredentialsRequest(**fields), timeout=10  # type: ignore[arg-type]
        )


def test_set_credentials_lets_the_daemon_serve_a_private_layer(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    registry, reference, layer = private_image
    with _daemon_without_credentials(short_tmp) as daemon:
        assert _lazy_prepare(daemon, "first", reference, layer) == grpc.StatusCode.OK
        assert "remote-snapshot-prepared=false" in daemon.log()
        reply = _set_credentials(daemon, host=registry.host, username=USER, secret=PASSWORD)
        assert 0 < reply.expires_in_seconds <= 12 * 3600
        assert _lazy_prepare(daemon, "second", reference, layer) == grpc.StatusCode.ALREADY_EXISTS
        assert "remote-snapshot-prepared=true" in daemon.log()
        assert PASSWORD not in daemon.log()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": "", "username": "u", "secret": "p"}, "host must be"),
        ({"host": "a b", "username": "u", "secret": "p"}, "host must be"),
        ({"host": "h:5000", "username": "u", "secret": ""}, "secret"),
        ({"host": "h:5000", "username": "u", "secret": "p", "ttl_seconds": -1}, "ttl_seconds"),
    ],
)
def test_bad_credentials_requests_are_invalid_argument(
    short_tmp: Path, fields: dict[str, object], message: str
) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        with pytest.raises(grpc.RpcError) as raised:
            _set_credentials(daemon, **fields)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (raised.value.details() or "")


@pytest.mark.containerd
def test_pull_with_user_hands_credentials_to_the_daemon(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    if not containerd_available():
        pytest.skip("containerd is not installed")
    _, reference, _ = private_image
    with _daemon_without_credentials(short_tmp) as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        pulled = subprocess.run(
            [*LAZYSNAP, "pull", "--address", str(containerd.address), "--namespace",
             containerd.namespace, "--snapshotter-address", str(daemon.address),
             "--user", f"{USER}:{PASSWORD}", reference],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert pulled.returncode == 0, pulled.stderr
        assert " remote " in pulled.stdout, pulled.stdout
        out = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference, "p1",
                             "/bin/echo", "private and lazy").stdout
        assert out == "private and lazy\n"
        assert PASSWORD not in daemon.log() and PASSWORD not in pulled.stderr
