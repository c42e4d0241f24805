"""Mirrors from hosts.toml end to end: a second docker-registry as a pull-through cache of the
first, a dead mirror (a closed port, a port that accepts and never answers), a mirror dying
mid-run, and IPv6 literal hosts. Real containerd 1.6, the lazysnap daemon, `lazysnap pull`.

The registries' access logs tell who served what: lazysnap's requests carry its user agent,
the pull-through mirror's requests to the origin carry Go's.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.registry_support.fault_proxy import blob_gets, garbage, run_fault_proxy
from tests.integration.registry_support.helpers import require, write_hosts_toml
from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry
from tests.support.marks import full_stack
from tests.support.ports import free_port

pytestmark = full_stack()

LAZYSNAP = [sys.executable, "-m", "snapshotter.cli"]
USER_AGENT = "lazysnap/"
FILES = 24
FILE_SIZE = 150_000  # random bytes: one chunk, one range request per file
# host-backoff lines: `registry host-backoff host=H failures=N seconds=S error=E`
BACKOFF_LINE = re.compile(r"registry host-backoff host=(\S+) failures=(\d+)")
ACCESS_LINE = re.compile(
    r'^(\S+) - - \[[^\]]+\] "(\w+) (\S+) [^"]*" (\d{3}) (\d+) "[^"]*" "([^"]*)"$'
)


@dataclass(frozen=True)
class Access:
    remote: str
    method: str
    uri: str
    status: int
    size: int
    user_agent: str


def accesses(registry: RunningRegistry) -> list[Access]:
    found = []
    for line in registry.log().splitlines():
        match = ACCESS_LINE.match(line)
        if match:
            remote, method, uri, status, size, agent = match.groups()
            found.append(Access(remote, method, uri, int(status), int(size), agent))
    return found


def lazysnap_ranges(registry: RunningRegistry) -> list[Access]:
    """lazysnap's blob GETs answered with a range."""
    return [
        a for a in accesses(registry)
        if a.user_agent.startswith(USER_AGENT) and "/blobs/" in a.uri and a.status == 206
    ]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Image:
    reference: str
    repository: str
    blob_digests: tuple[str, ...]
    hashes: dict[str, str]  # /data/fNN -> sha256 hex


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningRegistry, Image]]:
    """The origin, listening on both loopbacks when the machine has ::1, with one eStargz
    image: busybox, then FILES incompressible files."""
    if not registry_available():
        pytest.skip("Debian's docker-registry is not installed")
    workdir = tmp_path_factory.mktemp("mirror-origin")
    rng = random.Random(10)
    data = {f"data/f{i:02d}": rng.randbytes(FILE_SIZE) for i in range(FILES)}
    builder = oci.TarBuilder().dir("data")
    for name, content in data.items():
        builder.file(name, content)
    layers = [
        oci.seekable_layer(oci.busybox_tar(), "estargz"),
        oci.seekable_layer(builder.tar(), "estargz"),
    ]
    oci.write_layout(workdir / "layout", layers)
    with run_registry(workdir / "registry", ipv6=has_ipv6_loopback()) as registry:
        reference = f"{registry.host}/mirrored/app:v1"
        oci.push_layout(workdir / "layout", "latest", reference)
        hashes = {f"/{n}": hashlib.sha256(c).hexdigest() for n, c in data.items()}
        image = Image(reference, "mirrored/app", tuple(layer.digest for layer in layers), hashes)
        yield registry, image


@contextmanager
def pull_through_mirror(
    workdir: Path, origin: RunningRegistry, *, ipv6: bool = False
) -> Iterator[RunningRegistry]:
    proxy = {"proxy": {"remoteurl": origin.url}}
    with run_registry(workdir, extra_config=proxy, ipv6=ipv6) as mirror:
        yield mirror


def warm(mirror_url: str, image: Image) -> None:
    """Have the pull-through mirror store every blob, and wait until it serves ranges of them
    (it stores a blob after streaming it whole once)."""
    for digest in image.blob_digests:
        url = f"{mirror_url}/v2/{image.repository}/blobs/{digest}"
        deadline = time.monotonic() + 30
        while True:
            request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
                if answer.status == 206:
                    break
            assert time.monotonic() < deadline, f"mirror never stored {digest}"
            time.sleep(0.2)


@contextmanager
def stack(workdir: Path, hosts_dir: Path) -> Iterator[tuple[Daemon, RunningContainerd]]:
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    config = workdir / "lazysnap.toml"
    config.write_text("[lazy]\nbackground_fetch = false\n")  # reads only what containers read
    args = ["--config", str(config), "--hosts-dir", str(hosts_dir)]
    with running_daemon(workdir / "d", extra_args=args) as daemon, \
            run_containerd(workdir / "c", daemon.address) as containerd:
        yield daemon, containerd


def pull(
    daemon: Daemon, containerd: RunningContainerd, hosts_dir: Path, image: Image
) -> subprocess.CompletedProcess[str]:
    pulled = subprocess.run(
        [*LAZYSNAP, "pull", "--address", str(containerd.address), "--namespace",
         containerd.namespace, "--snapshotter-address", str(daemon.address),
         "--hosts-dir", str(hosts_dir), image.reference],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert pulled.returncode == 0, pulled.stderr + daemon.log()[-3000:]
    layers = [line for line in pulled.stdout.splitlines() if line.startswith("layer ")]
    assert len(layers) == 2 and all(" remote " in line for line in layers), pulled.stdout
    return pulled


def read_files(
    containerd: RunningContainerd, daemon: Daemon, image: Image, name: str, paths: list[str]
) -> None:
    """Read ``paths`` in a container and check every byte through its hash."""
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", image.reference, name,
        "/bin/sha256sum", *paths, check=False,
    )
    assert result.returncode == 0, result.stderr + daemon.log()[-3000:]
    got = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert got == {p: image.hashes[p] for p in paths}


def backoffs(daemon: Daemon, host: str) -> list[int]:
    return [int(m.group(2)) for m in BACKOFF_LINE.finditer(daemon.log()) if m.group(1) == host]


def ns_of(access: Access) -> list[str]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(access.uri).query).get("ns", [])


# -- tests ----------------------------------------------------------------------------------


def test_pull_and_lazy_reads_go_through_a_pull_through_mirror_then_fall_back_when_it_dies(
    short_tmp: Path, origin: tuple[RunningRegistry, Image]
) -> None:
    registry, image = origin
    paths = sorted(image.hashes)
    hosts_dir = short_tmp / "certs.d"
    with pull_through_mirror(short_tmp / "mirror", registry) as mirror:
        write_hosts_toml(hosts_dir, registry.host, f"""
server = "{registry.url}"
[host."{mirror.url}"]
  capabilities = ["pull", "resolve"]
""")
        warm(mirror.url, image)
        with stack(short_tmp, hosts_dir) as (daemon, containerd):
            pull(daemon, containerd, hosts_dir, image)
            # Two files only: reading on would make the fetcher read ahead, in growing ranges,
            # the files the second container must fetch after the mirror died.
            read_files(containerd, daemon, image, "through-mirror", paths[:2])

            served = lazysnap_ranges(mirror)
            assert sum(a.size for a in served) >= 2 * FILE_SIZE, served
            ours = [a for a in accesses(mirror) if a.user_agent.startswith(USER_AGENT)]
            assert ours and all(ns_of(a) == [registry.host] for a in ours), ours[:5]
            assert [a for a in accesses(registry) if a.user_agent.startswith(USER_AGENT)] == []

            # The mirror dies mid-run: the attached layer's next reads go to the origin.
            mirror.process.kill()
            mirror.process.wait()
            tail = paths[FILES // 2 :]
            read_files(containerd, daemon, image, "after-mirror-died", tail)
            origin_ranges = lazysnap_ranges(registry)
            assert sum(a.size for a in origin_ranges) >= len(tail) * FILE_SIZE
            assert all(ns_of(a) == [] for a in origin_ranges)  # the origin is itself
            # Refused once, then skipped while in back-off: not one refusal per read.
            failures = backoffs(daemon, mirror.host)
            assert 1 <= len(failures) < len(origin_ranges), daemon.log()[-3000:]


def test_wrong_bytes_from_a_mirror_are_never_served_and_put_it_in_backoff(
    short_tmp: Path, origin: tuple[RunningRegistry, Image]
) -> None:
    """A mirror that corrupts what it passes on (bytes of the right length, wrong): the chunk
    check catches them, they are never served (a read gets EIO or, asked again, right bytes),
    the mirror goes into back-off and the files read right."""
    registry, image = origin
    paths = sorted(image.hashes)[:3]
    hosts_dir = short_tmp / "certs.d"
    with run_fault_proxy(registry.host) as mirror:
        write_hosts_toml(hosts_dir, registry.host, f"""
server = "{registry.url}"
[host."http://{mirror.host}"]
  capabilities = ["pull", "resolve"]
""")
        with stack(short_tmp, hosts_dir) as (daemon, containerd):
            pull(daemon, containerd, hosts_dir, image)
            mirror.inject(garbage(match=blob_gets))
            first = containerd.ctr(
                "run", "--rm", "--snapshotter", "lazysnap", image.reference, "corrupted",
                "/bin/sha256sum", *paths, check=False,
            )
            assert mirror.applied == ["garbage"]
            for line in first.stdout.splitlines():  # what was printed is right, if anything
                digest, path = line.split()
                assert image.hashes[path] == digest, line
            assert "chunk rejected" in daemon.log()
            assert backoffs(daemon, mirror.host) == [1]
            assert f"host={mirror.host} failures=1 seconds=5.0 error=DigestMismatchError" in (
                daemon.log()
            )
            read_files(containerd, daemon, image, "after-garbage", paths)


@contextmanager
def silent_port() -> Iterator[int]:
    """A port whose connections the kernel accepts and nobody ever answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        yield listener.getsockname()[1]


@contextmanager
def closed_port() -> Iterator[int]:
    yield free_port()


@pytest.mark.parametrize("dead", [closed_port, silent_port], ids=["closed", "silent"])
def test_a_dead_mirror_falls_back_to_the_origin_and_is_skipped_during_its_backoff(
    short_tmp: Path, origin: tuple[RunningRegistry, Image], dead: object
) -> None:
    registry, image = origin
    paths = sorted(image.hashes)
    hosts_dir = short_tmp / "certs.d"
    with dead() as port:  # type: ignore[operator]
        mirror_host = f"127.0.0.1:{port}"
        write_hosts_toml(hosts_dir, registry.host, f"""
server = "{registry.url}"
[host."http://{mirror_host}"]
  capabilities = ["pull", "resolve"]
""")
        before = lazysnap_ranges(registry)
        with stack(short_tmp, hosts_dir) as (daemon, containerd):
            pull(daemon, containerd, hosts_dir, image)
            read_files(containerd, daemon, image, "dead-mirror", paths)
            log = daemon.log()
        reads = lazysnap_ranges(registry)[len(before) :]
        assert sum(a.size for a in reads) >= FILES * FILE_SIZE
        failures = backoffs(daemon, mirror_host)
        # Each failure doubles the back-off from 5 s: a handful at most in a minute or two,
        # fewer than the reads that went to the origin meanwhile.
        assert 1 <= len(failures) < len(reads), log[-3000:]
        assert len(failures) <= 6, log[-3000:]
        assert failures == list(range(1, len(failures) + 1))
        if dead is silent_port:
            assert f"no answer from mirror {mirror_host} within 5 s" in log


def test_ipv6_literal_mirror_and_server_in_hosts_toml(
    short_tmp: Path, origin: tuple[RunningRegistry, Image]
) -> None:
    require(has_ipv6_loopback(), "this machine has no IPv6 loopback (::1)")
    registry, image = origin
    assert registry.ipv6_host is not None
    paths = sorted(image.hashes)[:4]
    hosts_dir = short_tmp / "certs.d"
    with pull_through_mirror(short_tmp / "mirror", registry, ipv6=True) as mirror:
        assert mirror.ipv6_host is not None
        # containerd before 2.0 cannot read these keys; lazysnap must.
        write_hosts_toml(hosts_dir, registry.host, f"""
server = "{registry.ipv6_url}"
[host."{mirror.ipv6_url}"]
  capabilities = ["pull", "resolve"]
""")
        warm(mirror.ipv6_url, image)
        with stack(short_tmp, hosts_dir) as (daemon, containerd):
            pull(daemon, containerd, hosts_dir, image)
            read_files(containerd, daemon, image, "ipv6", paths)
        ours = [a for a in accesses(mirror) if a.user_agent.startswith(USER_AGENT)]
        assert ours and all(a.remote == "::1" for a in ours), ours[:5]
        assert all(ns_of(a) == [registry.host] for a in ours)
        assert len(lazysnap_ranges(mirror)) >= len(paths)


def test_a_cold_pull_through_mirror_costs_no_backoff_and_no_wrong_bytes(
    short_tmp: Path, origin: tuple[RunningRegistry, Image]
) -> None:
    """distribution's proxy answers the first range of a blob it has not stored with the whole
    blob: those reads go to the origin, and the mirror, alive, is not put in back-off."""
    registry, image = origin
    paths = sorted(image.hashes)[:6]
    hosts_dir = short_tmp / "certs.d"
    with pull_through_mirror(short_tmp / "mirror", registry) as mirror:
        write_hosts_toml(hosts_dir, registry.host, f"""
server = "{registry.url}"
[host."{mirror.url}"]
  capabilities = ["pull", "resolve"]
""")
        with stack(short_tmp, hosts_dir) as (daemon, containerd):
            pull(daemon, containerd, hosts_dir, image)
            read_files(containerd, daemon, image, "cold-mirror", paths)
            log = daemon.log()
        whole = [
            a for a in accesses(mirror)
            if a.user_agent.startswith(USER_AGENT) and "/blobs/" in a.uri and a.status == 200
            and a.method == "GET"
        ]
        assert whole, accesses(mirror)  # the cold answers lazysnap abandoned
        assert lazysnap_ranges(registry)  # and read from the origin instead
        assert backoffs(daemon, mirror.host) == [], log[-3000:]
        assert "no-range-answer" in log
