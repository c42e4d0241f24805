"""A real registry behind a proxy that lies (200 to a Range, garbage from storage), floods (a
body with a gigabyte too much) or redirects to presigned URLs: reads recover once the fault is
gone, memory stays bounded, and no secret reaches a log line at any level."""

from __future__ import annotations

import io
import logging
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import (
    ClientOptions,
    Credentials,
    HostsConfig,
    RegistryClient,
    RegistryError,
    RemoteBlob,
    StaticCredentials,
    parse_reference,
)
from registry.manifest import sha256_digest
from snapshotter.logs import QUIET_LIBRARIES, setup_logging
from tests.integration.registry_support import fault_proxy as fp
from tests.integration.registry_support.helpers import require, run
from tests.integration.registry_support.images import LayerSpec, push_image, random_blob
from tests.integration.registry_support.tls import openssl_available
from tests.integration.registry_support.token_server import TokenServer, run_token_server
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry

# A body abandoned at its cap leaves httpx's and httpcore's nested body generators suspended;
# trio closes them when they are collected, and warns. The flood counter shows they stopped.
pytestmark = [
    pytest.mark.registry,
    pytest.mark.filterwarnings("ignore:Async generator 'httpx._:ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Async generator 'httpcore._:ResourceWarning"),
]

OPTIONS = ClientOptions(
    connect_timeout=1.0,
    read_timeout=2.0,
    request_timeout=5.0,
    max_attempts=3,
    backoff_initial=0.01,
    backoff_max=0.05,
)
FAULTED = random_blob(1024 * 1024, seed=301)
HEALTHY = random_blob(1024 * 1024, seed=302)
NAME = "hostile/app:v1"
USER, PASSWORD = "alice", "pw-Very-Secret-42"


@pytest.fixture(scope="module")
def proxied(docker_registry: RunningRegistry) -> Iterator[fp.FaultProxy]:
    async def push() -> None:
        async with RegistryClient(HostsConfig("/nonexistent")) as client:
            layers = [LayerSpec(FAULTED), LayerSpec(HEALTHY)]
            await push_image(client, f"{docker_registry.host}/{NAME}", layers)

    run(push)
    with fp.run_fault_proxy(docker_registry.host) as proxy:
        yield proxy


@pytest.fixture
def proxy(proxied: fp.FaultProxy) -> Iterator[fp.FaultProxy]:
    proxied.clear()
    proxied.applied.clear()
    proxied.redirect_blobs = False
    proxied.bad_objects.clear()
    proxied.flood_sent = 0
    proxied.stored.clear()
    yield proxied
    proxied.clear()
    proxied.redirect_blobs = False


def _client(tmp_path: Path) -> RegistryClient:
    return RegistryClient(HostsConfig(tmp_path / "hosts"), None, OPTIONS)


async def _open(client: RegistryClient, proxy: fp.FaultProxy, data: bytes) -> RemoteBlob:
    ref = parse_reference(f"{proxy.host}/{NAME}")
    return await client.open_blob(ref, sha256_digest(data), size=len(data))


async def _good_reads(blob: RemoteBlob, data: bytes, count: int, *, verify: bool = False) -> int:
    """How many of ``count`` reads returned the right bytes; on wrong bytes a verifying reader
    (as fusefs does per chunk) tells the blob to forget its redirect target."""
    good = 0
    step = (len(data) - 4096) // count
    for i in range(count):
        offset = i * step
        try:
            got = await blob.read_at(offset, 4096)
        except RegistryError:
            continue
        if got == data[offset : offset + 4096]:
            good += 1
        elif verify:
            blob.forget_redirect()
    return good


def test_one_200_breaks_neither_the_host_nor_the_layer(
    proxy: fp.FaultProxy, tmp_path: Path
) -> None:
    async def main() -> tuple[int, int]:
        async with _client(tmp_path) as client:
            faulted = await _open(client, proxy, FAULTED)
            healthy = await _open(client, proxy, HEALTHY)
            proxy.inject(fp.full())
            return await _good_reads(faulted, FAULTED, 40), await _good_reads(healthy, HEALTHY, 20)

    assert run(main) == (40, 20)
    assert proxy.applied == ["full"]


def test_a_host_without_ranges_is_asked_again_once_it_has_them(
    proxy: fp.FaultProxy, tmp_path: Path
) -> None:
    async def main() -> tuple[int, int]:
        async with _client(tmp_path) as client:
            blob = await _open(client, proxy, FAULTED)
            proxy.inject(*[fp.full()] * (OPTIONS.max_attempts + 1))
            during = await _good_reads(blob, FAULTED, 2)  # every attempt, then one attempt
            after = await _good_reads(blob, FAULTED, 20)  # the proxy is fixed
            return during, after

    assert run(main) == (0, 20)
    assert proxy.applied == ["full"] * (OPTIONS.max_attempts + 1)


def test_a_redirect_target_serving_garbage_is_forgotten(
    proxy: fp.FaultProxy, tmp_path: Path
) -> None:
    proxy.redirect_blobs = True

    async def main() -> tuple[int, int]:
        async with _client(tmp_path) as client:
            blob = await _open(client, proxy, FAULTED)
            before = await _good_reads(blob, FAULTED, 5, verify=True)
            proxy.bad_objects.update(proxy.stored)  # the storage node we were sent to goes bad
            await _good_reads(blob, FAULTED, 1, verify=True)
            # The registry now sends new readers (and us, once we ask) to a healthy node.
            return before, await _good_reads(blob, FAULTED, 40, verify=True)

    assert run(main) == (5, 40)
    assert len(proxy.stored) == 2  # one redirect before the fault, one fresh one after


def test_a_flooding_range_answer_is_cut_off(proxy: fp.FaultProxy, tmp_path: Path) -> None:
    extra = 1024 * 1024 * 1024
    proxy.inject(fp.oversize(extra), fp.oversize(extra))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    async def main() -> int:
        async with _client(tmp_path) as client:
            return await _good_reads(await _open(client, proxy, FAULTED), FAULTED, 1)

    assert run(main) == 1  # two floods cut off, the third attempt answers
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert proxy.applied == ["oversize", "oversize"]
    assert proxy.flood_sent < 2 * 64 * 1024 * 1024  # socket buffers, not the gigabytes
    assert grown < 200 * 1024 * 1024


# -- secrets in logs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningRegistry, TokenServer]]:
    require(
        registry_available() and openssl_available(),
        "needs Debian's docker-registry and the openssl CLI",
    )
    workdir = tmp_path_factory.mktemp("hostile-token-registry")
    with (
        run_token_server(workdir / "token", users={USER: PASSWORD}) as tokens,
        run_registry(workdir, extra_config={"auth": tokens.registry_auth_config()}) as reg,
    ):
        yield reg, tokens


@pytest.fixture
def daemon_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The daemon's own logging setup at DEBUG, writing into a buffer instead of stderr."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    monkeypatch.setattr(sys, "stderr", buffer)
    setup_logging("debug", "json")
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def test_no_secret_reaches_the_logs_at_debug(
    token_registry: tuple[RunningRegistry, TokenServer],
    tmp_path: Path,
    daemon_logging: io.StringIO,
) -> None:
    registry, _tokens = token_registry
    layer = random_blob(300_000, seed=303)
    creds = StaticCredentials({registry.host: Credentials(USER, PASSWORD)})

    with fp.run_fault_proxy(registry.host) as proxy:
        name = f"{proxy.host}/secret/app:v1"
        proxy.redirect_blobs = True

        async def main() -> None:
            async with RegistryClient(HostsConfig(tmp_path), creds, OPTIONS) as client:
                await push_image(client, f"{registry.host}/secret/app:v1", [LayerSpec(layer)])
            proxied_creds = StaticCredentials({proxy.host: Credentials(USER, PASSWORD)})
            async with RegistryClient(HostsConfig(tmp_path), proxied_creds, OPTIONS) as client:
                ref = parse_reference(name)
                image = await client.resolve_image(ref)
                blob = await client.open_blob(ref, image.manifest.layers[0].digest)
                assert await blob.read_at(100, 1000) == layer[100:1100]
                proxy.signature = "cm90YXRlZC1zaWduYXR1cmU"  # the presigned URL expires
                assert await blob.read_at(5000, 1000) == layer[5000:6000]

        run(main)
        signatures = ["c2lnbmF0dXJlLXNlY3JldA", proxy.signature]
        tokens = [a.removeprefix("Bearer ") for a in proxy.authorizations if "Bearer" in a]

    logged = daemon_logging.getvalue()
    assert '"level": "debug"' in logged and "token-fetched" in logged  # DEBUG was captured
    assert len(proxy.stored) == 2 and tokens  # both redirects and the token exchange happened
    for secret in [*signatures, *tokens, PASSWORD, "account=", "X-Amz-Credential"]:
        assert secret not in logged, f"{secret[:12]}... appears in the logs"
    assert "redirect-dropped" in logged  # the expired presigned URL was logged, redacted
