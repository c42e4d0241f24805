"""Registry credentials reach the daemon over its own socket, never through labels or logs:
a lazy layer in a password-protected registry is served once `lazysnap pull --user` (or the
Daemon/SetCredentials RPC) has handed the daemon the credentials its docker config lacks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc, snapshots_pb2
from snapshotter.labels import CRI_IMAGE_REF, CRI_LAYER_DIGEST, ESTARGZ_TOC_DIGEST, SNAPSHOT_REF
from tests.integration.registry_support.htpasswd import write_htpasswd
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry
from tests.support.secret_scan import files_holding

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

USER, PASSWORD = "bob", "s3cret-Pa55word"
OTHER_USER, OTHER_PASSWORD = "carol", "an0ther-Pa55word"
LAZYSNAP = [".venv/bin/lazysnap"]


@pytest.fixture(scope="module")
def private_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry,
                                                                              str, oci.Layer]]:
    if not registry_available():
        pytest.skip("Debian's docker-registry is not installed")
    workdir = tmp_path_factory.mktemp("private-registry")
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD, OTHER_USER: OTHER_PASSWORD})
    auth = {"htpasswd": {"realm": "lazysnap-test", "path": str(htpasswd)}}
    with run_registry(workdir, extra_config={"auth": auth}) as registry:
        layer = oci.seekable_layer(oci.busybox_tar(), "estargz")
        oci.write_layout(workdir / "layout", [layer])
        reference = f"{registry.host}/private/busybox:latest"
        for name in (reference, f"{registry.host}/team/second:latest"):
            subprocess.run(
                ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                 "--dest-creds", f"{USER}:{PASSWORD}", f"oci:{workdir / 'layout'}:latest",
                 f"docker://{name}"],
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
        ESTARGZ_TOC_DIGEST: dict(layer.annotations)[ESTARGZ_TOC_DIGEST],
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
        # The daemon resolved the image with the handed-over credentials (Daemon/Resolve).
        assert f"resolved image={reference}" in daemon.log()
        assert "registry credentials set host=" in daemon.log()


def _pull(containerd: RunningContainerd, reference: str, *extra: str,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LAZYSNAP, "pull", "--address", str(containerd.address), "--namespace",
         containerd.namespace, *extra, reference],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.containerd
def test_pull_through_the_daemon_hands_over_the_callers_docker_config(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    """The daemon's docker config lacks the registry: the CLI hands over its own entry."""
    if not containerd_available():
        pytest.skip("containerd is not installed")
    registry, reference, _ = private_image
    config = short_tmp / "caller-docker"
    config.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    with _daemon_without_credentials(short_tmp) as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        pulled = _pull(containerd, reference, "--snapshotter-address", str(daemon.address),
                       env={"DOCKER_CONFIG": str(config)})
        assert pulled.returncode == 0, pulled.stderr + daemon.log()[-2000:]
        assert " remote " in pulled.stdout, pulled.stdout
        assert f"resolved image={reference}" in daemon.log()
        assert PASSWORD not in daemon.log() and PASSWORD not in pulled.stderr


@pytest.mark.containerd
def test_wrong_password_through_the_daemon_fails_like_a_local_pull(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    if not containerd_available():
        pytest.skip("containerd is not installed")
    _, reference, _ = private_image
    wrong = "not-the-Pa55word"
    with _daemon_without_credentials(short_tmp) as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        local = _pull(containerd, reference, "--user", f"{USER}:{wrong}")
        through = _pull(containerd, reference, "--user", f"{USER}:{wrong}",
                        "--snapshotter-address", str(daemon.address))
        assert through.returncode == local.returncode == 1, through.stdout
        (error,) = through.stderr.strip().splitlines()
        assert error == local.stderr.strip(), (error, local.stderr)
        assert error.startswith(f"lazysnap pull: {reference}: "), error
        assert wrong not in error and wrong not in daemon.log()


def test_set_credentials_for_an_image_names_its_registry(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    registry, reference, layer = private_image
    with _daemon_without_credentials(short_tmp) as daemon:
        _set_credentials(daemon, image=reference, username=USER, secret=PASSWORD)
        assert f"registry credentials set host={registry.host} " in daemon.log()
        assert _lazy_prepare(daemon, "k", reference, layer) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as raised:
            _set_credentials(daemon, image="Bad//Name", username=USER, secret=PASSWORD)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.containerd
def test_pull_through_the_daemon_fetches_a_private_plain_layer_itself(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    """A plain gzip layer is not lazy: the CLI starts its own registry client for its blob,
    with the same --user credentials (the password from the environment, read once)."""
    if not containerd_available():
        pytest.skip("containerd is not installed")
    registry, _, lazy = private_image
    plain = oci.gzip_layer(oci.TarBuilder().dir("etc").file("etc/plain", b"plain\n").tar())
    oci.write_layout(short_tmp / "layout", [lazy, plain])
    reference = f"{registry.host}/private/mixed:latest"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         "--dest-creds", f"{USER}:{PASSWORD}", f"oci:{short_tmp / 'layout'}:latest",
         f"docker://{reference}"],
        check=True, capture_output=True, timeout=120,
    )
    with _daemon_without_credentials(short_tmp) as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        pulled = _pull(containerd, reference, "--user", USER,
                       "--snapshotter-address", str(daemon.address),
                       env={"LAZYSNAP_REGISTRY_PASSWORD": PASSWORD})
        assert pulled.returncode == 0, pulled.stderr + daemon.log()[-2000:]
        outcomes = [line.split()[3] for line in pulled.stdout.splitlines()
                    if line.startswith("layer ")]
        assert outcomes == ["remote", "applied"], pulled.stdout
        assert f"resolved image={reference}" in daemon.log()
        out = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference, "p2",
                             "/bin/cat", "/etc/plain").stdout
        assert out == "plain\n"
        assert PASSWORD not in daemon.log() and PASSWORD not in pulled.stderr


def test_a_wrong_password_after_a_right_one_is_refused_and_the_right_one_stays(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    """Issue 15 item 7: the daemon checks a new set against the registry before it replaces
    the stored one, so a later client's wrong password cannot take over the repository."""
    _, reference, layer = private_image
    wrong = "not-the-Pa55word"
    with _daemon_without_credentials(short_tmp) as daemon:
        _set_credentials(daemon, image=reference, username=USER, secret=PASSWORD)
        with pytest.raises(grpc.RpcError) as raised:
            _set_credentials(daemon, image=reference, username=USER, secret=wrong)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong not in (raised.value.details() or "")
        assert _lazy_prepare(daemon, "k", reference, layer) == grpc.StatusCode.ALREADY_EXISTS
        assert wrong not in daemon.log() and PASSWORD not in daemon.log()


def test_two_repositories_on_one_host_keep_their_own_credentials(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    registry, first, layer = private_image
    second = f"{registry.host}/team/second:latest"
    with _daemon_without_credentials(short_tmp) as daemon:
        _set_credentials(daemon, image=first, username=USER, secret=PASSWORD)
        _set_credentials(daemon, image=second, username=OTHER_USER, secret=OTHER_PASSWORD)
        with pytest.raises(grpc.RpcError) as raised:  # a wrong set for one of them
            _set_credentials(daemon, image=second, username=OTHER_USER, secret="wrong-pw")
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        log = daemon.log()
        assert "repository=private/busybox user='bob'" in log
        assert "repository=team/second user='carol'" in log
        assert _lazy_prepare(daemon, "a", first, layer) == grpc.StatusCode.ALREADY_EXISTS
        assert _lazy_prepare(daemon, "b", second, layer) == grpc.StatusCode.ALREADY_EXISTS
        for secret in (PASSWORD, OTHER_PASSWORD, "wrong-pw"):
            assert secret not in daemon.log()


@pytest.mark.containerd
def test_password_stdin_keeps_the_password_out_of_argv_logs_and_state(
    short_tmp: Path, private_image: tuple[RunningRegistry, str, oci.Layer]
) -> None:
    if not containerd_available():
        pytest.skip("containerd is not installed")
    _, reference, _ = private_image
    with _daemon_without_credentials(short_tmp) as daemon, run_containerd(
        short_tmp / "c", daemon.address
    ) as containerd:
        pulling = subprocess.Popen(
            [*LAZYSNAP, "pull", "--address", str(containerd.address), "--namespace",
             containerd.namespace, "--snapshotter-address", str(daemon.address),
             "--user", USER, "--password-stdin", reference],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # What ps shows is /proc/<pid>/cmdline: read it while the pull waits for its password.
        # Right after the fork it is still empty (or the parent's) until the exec: wait for it.
        deadline = time.monotonic() + 10
        cmdline = b""
        while b"--password-stdin" not in cmdline and time.monotonic() < deadline:
            cmdline = Path(f"/proc/{pulling.pid}/cmdline").read_bytes()
            time.sleep(0.01)
        out, err = pulling.communicate(PASSWORD + "\n", timeout=120)
        assert pulling.returncode == 0, err + daemon.log()[-2000:]
        assert " remote " in out, out
        assert PASSWORD.encode() not in cmdline and b"--password-stdin" in cmdline
        assert PASSWORD not in daemon.log() and PASSWORD not in err
        assert files_holding(daemon.root, PASSWORD.encode()) == []
