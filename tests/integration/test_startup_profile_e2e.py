"""Startup profiles with only real parts: Debian's containerd 1.6 + runc, the docker-registry
on loopback (2.8: no referrers API, so the profile is listed under the referrers tag) and the
lazysnap daemon, background fetch off so that the registry serves only what is asked for.

Node 1 (``[profile] publish``) pulls an eStargz image, runs a container, and pushes what the
container read as the image's startup profile. Node 2 (fresh containerd and daemon state,
prefetch on by default) pulls the image: the profile is found and its files are fetched before
any container runs, so the same container then needs (almost) nothing from the registry.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from registry import create_client, parse_reference
from snapshotter import startup_profile as sp
from tests.integration.test_lazy_end_to_end import _LOG_GET, _lazysnap
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.lazy_e2e import HELLO, add_host_files, base_layer, python_files
from tests.support.marks import full_stack

pytestmark = full_stack()

TIMEOUT = 120.0


@contextmanager
def node(workdir: Path, profile: str) -> Iterator[tuple[Daemon, RunningContainerd]]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "lazysnap.toml"
    config.write_text(f"[lazy]\nbackground_fetch = false\nexec_prefetch_depth = 0\n"
                      f"[profile]\n{profile}\n")
    with running_daemon(workdir / "d", extra_args=["--config", str(config)]) as daemon, \
            run_containerd(workdir / "c", daemon.address) as containerd:
        yield daemon, containerd


def _pull(containerd: RunningContainerd, reference: str) -> None:
    hosts_dir = containerd.workdir / "certs.d"  # empty: loopback registries get plain HTTP
    hosts_dir.mkdir(exist_ok=True)
    result = _lazysnap("pull", reference, "--address", str(containerd.address),
                       "--namespace", containerd.namespace, "--hosts-dir", str(hosts_dir))
    assert result.returncode == 0, result.stderr
    outcomes = [line.split()[3] for line in result.stdout.splitlines()
                if line.startswith("layer ")]
    assert outcomes and set(outcomes) == {"remote"}, result.stdout


def _wait_for(daemon: Daemon, pattern: str, count: int = 1) -> str:
    deadline = time.monotonic() + TIMEOUT
    while len(re.findall(pattern, daemon.log())) < count:
        assert time.monotonic() < deadline, daemon.log()[-4000:]
        time.sleep(0.2)
    return daemon.log()


def _layer_bytes(log: str) -> int:
    return sum(int(m["written"]) for m in _LOG_GET.finditer(log) if "/blobs/" in m["uri"])


async def _profiles(reference: str, manifest_digest: str) -> list[sp.StartupProfile]:
    hosts = Path(tempfile.mkdtemp(prefix="lz-profile-hosts"))
    ref = parse_reference(reference)
    try:
        async with create_client(hosts) as client:
            found = await client.fetch_referrers(ref, manifest_digest, sp.ARTIFACT_TYPE)
            profiles = []
            for referrer in found.of_type(sp.ARTIFACT_TYPE):
                manifest = (await client.fetch_manifest(ref, referrer.digest)).content
                blob = sp.profile_blob_of(manifest, manifest_digest)
                profiles.append(sp.parse(await client.fetch_blob(ref, blob.digest)))
            return profiles
    finally:
        shutil.rmtree(hosts, ignore_errors=True)


def test_a_profile_published_by_one_node_is_prefetched_by_the_next_pull(
    short_tmp: Path, docker_registry: RunningRegistry,
) -> None:
    files = python_files()
    read = files[len(files) // 3]  # a python file the container reads
    layers = (oci.gzip_layer(base_layer()),
              oci.gzip_layer(add_host_files(oci.TarBuilder(), files).tar()))
    layout = short_tmp / "layout"
    oci.write_layout(layout, layers)
    plain = f"{docker_registry.host}/profile/app:plain"
    oci.push_layout(layout, "latest", plain)
    reference = f"{docker_registry.host}/profile/app:estargz"
    converted = _lazysnap("convert", plain, reference, "--format", "estargz")
    assert converted.returncode == 0, converted.stderr
    manifest_digest = converted.stdout.split()[-1]
    command = ("/bin/sh", "-c", f"cat /etc/hello && sha256sum {read} >/dev/null")

    with node(short_tmp / "1", "publish = true\nrecord_seconds = 2") as (daemon, containerd):
        _pull(containerd, reference)
        start = len(docker_registry.log())
        out = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference, "one",
                             *command, timeout=180).stdout
        assert out == HELLO.decode()
        needed = _layer_bytes(docker_registry.log()[start:])
        log = _wait_for(daemon, r"startup_profile_publish(ed|_failed)|startup_profile_skipped")
        assert "startup profile published" in log, log[-4000:]

    (profile,) = trio.run(_profiles, reference, manifest_digest)
    listed = [f.path for files_ in profile.layers.values() for f in files_]
    assert str(read) in listed and "/etc/hello" in listed and "/bin/busybox" in listed

    with node(short_tmp / "2", "") as (daemon, containerd):
        _pull(containerd, reference)
        log = _wait_for(daemon, "profile prefetch done", count=2)  # both layers
        assert "startup profile found" in log
        start = len(docker_registry.log())
        out = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference, "two",
                             *command, timeout=180).stdout
        assert out == HELLO.decode()
        after = _layer_bytes(docker_registry.log()[start:])
    print(f"\nrun 1 fetched {needed} layer bytes while running; run 2 after the profile "
          f"prefetch: {after}")
    assert needed > 0 and after <= needed // 10, (needed, after)


def test_with_prefetch_off_the_profile_is_not_looked_up(
    short_tmp: Path, docker_registry: RunningRegistry,
) -> None:
    layout = short_tmp / "layout"
    oci.write_layout(layout, (oci.gzip_layer(base_layer()),))
    plain = f"{docker_registry.host}/profile/off:plain"
    oci.push_layout(layout, "latest", plain)
    reference = f"{docker_registry.host}/profile/off:estargz"
    assert _lazysnap("convert", plain, reference, "--format", "estargz").returncode == 0
    start = len(docker_registry.log())
    with node(short_tmp / "n", "prefetch = false") as (_daemon, containerd):
        _pull(containerd, reference)
        time.sleep(1)
    # The SOCI lookup asks for referrers too, filtered by its own artifact type.
    assert "startup-profile" not in docker_registry.log()[start:]
