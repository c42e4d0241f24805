"""kubelet credential provider plugins as lazysnap's source of registry credentials: a plugin
written here hands out the password of a private registry (TLS + htpasswd, or token auth),
the registry rotates it mid-run, and the lazy reads go on after the 401 that follows, also
across a daemon restart. A password the plugin does not know fails the read with EIO and a
log line naming the image, at once. The password is never in a log, a file under the root,
nor ``ps``. The daemon's docker config is empty, so nothing else could give them."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from snapshotter._proto import snapshots_pb2
from snapshotter.daemon import keeper as fuse_keeper
from snapshotter.labels import CRI_IMAGE_REF, CRI_LAYER_DIGEST, ESTARGZ_TOC_DIGEST, SNAPSHOT_REF
from tests.integration.registry_support.helpers import write_hosts_toml
from tests.integration.registry_support.htpasswd import write_htpasswd
from tests.integration.registry_support.tls import make_test_ca, openssl_available
from tests.integration.registry_support.token_server import run_token_server
from tests.support import oci_image as oci
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry
from tests.support.secret_scan import files_holding

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

USER = "node-user"
PASSWORDS = ("Pr0vider-first-s3cret", "Pr0vider-rotated-s3cret", "Pr0vider-unknown-s3cret")
# Each read must reach the registry: the files are far apart in the blob and in their own
# directories, and read out of order, so no readahead, directory fetch or file completion
# brings one in with another.
FILES = {f"{name}/file": random.Random(name).randbytes(150_000) for name in "abcd"}
PADDING = random.Random("pad").randbytes(1 << 20)


@dataclass
class PrivateRegistry:
    registry: RunningRegistry
    reference: str
    layer: oci.Layer
    rotate: Callable[[str], None]  # the registry now accepts only this password
    hosts_toml: str
    tokens_outlive_rotation: float = 0.0  # seconds the tokens issued before it stay valid


def _push(registry_host: str, workdir: Path, password: str) -> tuple[str, oci.Layer]:
    builder = oci.TarBuilder().dir("pad")
    for index, (path, data) in enumerate(FILES.items()):
        builder = builder.dir(path.split("/")[0]).file(path, data)
        builder = builder.file(f"pad/{index}", PADDING)
    layer = oci.seekable_layer(builder.tar(), "estargz", chunk_size=64 << 10)
    oci.write_layout(workdir / "layout", [layer])
    reference = f"{registry_host}/private/provided:1"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         "--dest-creds", f"{USER}:{password}", f"oci:{workdir / 'layout'}:latest",
         f"docker://{reference}"],
        check=True, capture_output=True, timeout=120,
    )
    return reference, layer


@contextlib.contextmanager
def _htpasswd_tls(workdir: Path) -> Iterator[PrivateRegistry]:
    """docker-registry 2.8 reads its htpasswd file once: rotating restarts it, same port."""
    ca = make_test_ca(workdir / "pki")
    htpasswd = workdir / "htpasswd"

    def config() -> dict[str, object]:
        return {"http": {"tls": {"certificate": str(ca.server_cert), "key": str(ca.server_key)}},
                "auth": {"htpasswd": {"realm": "lazysnap-provider", "path": str(htpasswd)}}}

    write_htpasswd(htpasswd, {USER: PASSWORDS[0]})
    with contextlib.ExitStack() as stack:
        running = stack.enter_context(
            run_registry(workdir / "r", extra_config=config(), scheme="https"))
        port = int(running.host.rsplit(":", 1)[1])

        def rotate(password: str) -> None:
            stack.close()
            write_htpasswd(htpasswd, {USER: password})
            stack.enter_context(run_registry(workdir / "r", extra_config=config(),
                                             scheme="https", port=port))

        reference, layer = _push(running.host, workdir, PASSWORDS[0])
        shutil.copy(ca.ca_cert, workdir / "ca.pem")
        yield PrivateRegistry(running, reference, layer, rotate,
                              f'server = "https://{running.host}"\nca = "{workdir / "ca.pem"}"\n')


@contextlib.contextmanager
def _token(workdir: Path) -> Iterator[PrivateRegistry]:
    """Tokens live 3 s: after a rotation the next token request meets the refusal."""
    with run_token_server(workdir / "token", users={USER: PASSWORDS[0]}, anonymous_pull=False,
                          lifetime=3) as tokens, \
            run_registry(workdir / "r", extra_config={"auth": tokens.registry_auth_config()}
                         ) as running:

        def rotate(password: str) -> None:
            tokens.users[USER] = password

        reference, layer = _push(running.host, workdir, PASSWORDS[0])
        yield PrivateRegistry(running, reference, layer, rotate,
                              f'server = "http://{running.host}"\n', tokens_outlive_rotation=3.5)


PLUGIN = """#!{python}
import json, sys
request = json.load(sys.stdin)
with open({runs!r}, "a") as runs:
    runs.write(request["image"] + "\\n")
password = open(sys.argv[1]).read().strip()
json.dump({{"apiVersion": request["apiVersion"], "kind": "CredentialProviderResponse",
           "cacheKeyType": "Registry", "cacheDuration": "1h",
           "auth": {{{host!r}: {{"username": {user!r}, "password": password}}}}}}, sys.stdout)
"""


def _provider_files(work: Path, host: str) -> tuple[Path, Path, Path]:
    """The plugin (its password from a root-only file named in its args), kubelet's config
    for it, and the file the plugin reads the current password from."""
    bin_dir = work / "plugins"
    bin_dir.mkdir()
    source = work / "source-password"
    source.write_text(PASSWORDS[0])
    source.chmod(0o600)
    plugin = bin_dir / "test-provider"
    plugin.write_text(PLUGIN.format(python=sys.executable, runs=str(work / "runs"),
                                    host=host, user=USER))
    plugin.chmod(0o755)
    config = work / "providers.yaml"
    config.write_text(
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n"
        "  - name: test-provider\n"
        f'    matchImages: ["{host}"]\n'
        '    defaultCacheDuration: "10m"\n'
        "    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
        f'    args: ["{source}"]\n'
        "    env: [{name: PROVIDER_MODE, value: test}]\n")
    return bin_dir, config, source


def _prepare_lazily(daemon: Daemon, private: PrivateRegistry) -> None:
    labels = {SNAPSHOT_REF: private.layer.diff_id, CRI_IMAGE_REF: private.reference,
              CRI_LAYER_DIGEST: private.layer.digest,
              ESTARGZ_TOC_DIGEST: dict(private.layer.annotations)[ESTARGZ_TOC_DIGEST]}
    with daemon.snapshots() as stub, pytest.raises(grpc.RpcError) as remote:
        stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="extract", labels=labels))
    assert remote.value.code() == grpc.StatusCode.ALREADY_EXISTS, daemon.log()[-3000:]


def _layer_dir(daemon: Daemon) -> Path:
    (layer,) = daemon.listed_layers(1)
    return layer


def _leaks(daemon: Daemon) -> list[str]:
    found = []
    ps = subprocess.run(["ps", "axww", "-o", "args"], capture_output=True, text=True,
                        check=True).stdout
    for password in PASSWORDS:
        if password in daemon.log():
            found.append(f"log holds {password}")
        if password in ps:
            found.append(f"ps shows {password}")
        found += [f"{path} holds {password}"
                  for path in files_holding(daemon.root, password.encode())]
    return found


@pytest.mark.parametrize("kind", ["htpasswd-tls", "token"])
def test_provider_credentials_survive_rotation_and_restart(kind: str) -> None:
    if not (registry_available() and openssl_available()):
        pytest.skip("needs Debian's docker-registry and the openssl CLI")
    work = Path(tempfile.mkdtemp(prefix="lzk", dir="/tmp"))
    make = _htpasswd_tls if kind == "htpasswd-tls" else _token
    try:
        with make(work / "reg") as private:
            host = private.registry.host
            bin_dir, providers, source = _provider_files(work, host)
            hosts_dir = work / "hosts"
            write_hosts_toml(hosts_dir, host, private.hosts_toml)
            empty_docker_config = work / "docker-config"
            empty_docker_config.mkdir()
            config = work / "lazysnap.toml"
            config.write_text(
                "[lazy]\nbackground_fetch = false\n"
                f'[cri]\ncredential_provider_config = "{providers}"\n'
                f'credential_provider_bin_dir = "{bin_dir}"\n')
            with running_daemon(work / "d", extra_args=[
                    "--config", str(config), "--hosts-dir", str(hosts_dir)],
                    env={"DOCKER_CONFIG": str(empty_docker_config)}) as daemon:
                _prepare_lazily(daemon, private)
                layer = _layer_dir(daemon)
                assert (layer / "c/file").read_bytes() == FILES["c/file"]
                runs = (work / "runs").read_text().splitlines()
                assert runs == [f"{host}/private/provided"]  # cached under the registry

                # The registry rotates; the plugin's source learns the new password. The
                # next read meets a 401 (or the token server's refusal), the plugin runs
                # again past its 1 h cache, and the read succeeds.
                private.rotate(PASSWORDS[1])
                source.write_text(PASSWORDS[1])
                time.sleep(private.tokens_outlive_rotation)
                assert (layer / "a/file").read_bytes() == FILES["a/file"]
                assert len((work / "runs").read_text().splitlines()) == 2

                daemon.stop()
                daemon.start()
                assert (_layer_dir(daemon) / "d/file").read_bytes() == FILES["d/file"]

                # A password the plugin does not know: the read fails with EIO, logged with
                # the image, after one fresh lookup; never a hang.
                private.rotate(PASSWORDS[2])
                time.sleep(private.tokens_outlive_rotation)
                with pytest.raises(OSError) as failed:
                    (_layer_dir(daemon) / "b/file").read_bytes()
                assert failed.value.errno == errno.EIO
                log = daemon.log()
                assert "lazy read refused by the registry" in log
                assert private.reference in log
                assert "credential provider answered" in log
                assert _leaks(daemon) == []
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(work / "d" / "root"))
        shutil.rmtree(work, ignore_errors=True)


def test_a_hung_or_garbage_plugin_falls_through_to_the_docker_config(short_tmp: Path) -> None:
    """Bad plugins are logged and the lookup goes on: the docker config still works."""
    if not registry_available():
        pytest.skip("needs Debian's docker-registry")
    htpasswd = write_htpasswd(short_tmp / "htpasswd", {USER: PASSWORDS[0]})
    auth = {"htpasswd": {"realm": "lazysnap-provider", "path": str(htpasswd)}}
    with run_registry(short_tmp / "r", extra_config={"auth": auth}) as registry:
        reference, layer = _push(registry.host, short_tmp, PASSWORDS[0])
        bin_dir = short_tmp / "plugins"
        bin_dir.mkdir()
        (bin_dir / "garbage").write_text(f"#!/bin/sh\necho 'not json {PASSWORDS[0]}'\n")
        (bin_dir / "garbage").chmod(0o755)
        providers = short_tmp / "providers.json"
        providers.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
            "providers": [
                {"name": name, "matchImages": [registry.host], "defaultCacheDuration": "1m",
                 "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}
                for name in ("absent", "garbage")]}))
        docker_config = short_tmp / "docker"
        docker_config.mkdir()
        token = base64.b64encode(f"{USER}:{PASSWORDS[0]}".encode()).decode()
        (docker_config / "config.json").write_text(
            json.dumps({"auths": {registry.host: {"auth": token}}}))
        config = short_tmp / "lazysnap.toml"
        config.write_text(f'[cri]\ncredential_provider_config = "{providers}"\n'
                          f'credential_provider_bin_dir = "{bin_dir}"\n')
        with running_daemon(short_tmp / "d", extra_args=["--config", str(config)],
                            env={"DOCKER_CONFIG": str(docker_config)}) as daemon:
            _prepare_lazily(daemon, PrivateRegistry(registry, reference, layer,
                                                    lambda _p: None, ""))
            log = daemon.log()
            assert "credential provider plugin not found or not executable" in log
            assert log.count("credential provider gave no credentials") >= 2
            assert PASSWORDS[0] not in log
