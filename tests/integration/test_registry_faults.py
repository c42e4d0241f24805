"""Faults injected between the client and the real registry: every read returns the right bytes
or raises the right error, within its time bound."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from registry import (
    ClientOptions,
    HostsConfig,
    RegistryClient,
    RegistryError,
    RegistryTimeoutError,
    ServerError,
    TransportError,
    parse_reference,
)
from registry.manifest import sha256_digest
from tests.integration.registry_support import fault_proxy as fp
from tests.integration.registry_support.helpers import run
from tests.integration.registry_support.images import LayerSpec, push_image, random_blob
from tests.support.docker_registry import RunningRegistry

pytestmark = pytest.mark.registry

OPTIONS = ClientOptions(
    connect_timeout=1.0,
    read_timeout=0.5,
    request_timeout=1.5,
    max_attempts=3,
    backoff_initial=0.01,
    backoff_max=0.05,
    retry_after_max=0.2,
)
# The longest a read may take: every attempt running into its deadline, plus backoff.
BOUND = OPTIONS.max_attempts * (OPTIONS.request_timeout + OPTIONS.retry_after_max) + 1.0
LAYER = random_blob(2 * 1024 * 1024, seed=99)
NAME = "faults/app:v1"


@pytest.fixture(scope="module")
def proxied(docker_registry: RunningRegistry) -> Iterator[fp.FaultProxy]:
    async def push() -> None:
        async with RegistryClient(HostsConfig("/nonexistent")) as client:
            await push_image(client, f"{docker_registry.host}/{NAME}", [LayerSpec(LAYER)])

    run(push)
    with fp.run_fault_proxy(docker_registry.host) as proxy:
        yield proxy


@pytest.fixture
def proxy(proxied: fp.FaultProxy) -> Iterator[fp.FaultProxy]:
    proxied.clear()
    proxied.applied.clear()
    yield proxied
    proxied.clear()


def _client(tmp_path: Path) -> RegistryClient:
    return RegistryClient(HostsConfig(tmp_path / "hosts"), None, OPTIONS)


async def _read(proxy: fp.FaultProxy, tmp_path: Path, offset: int, length: int) -> bytes:
    ref = parse_reference(f"{proxy.host}/{NAME}")
    async with _client(tmp_path) as client:
        blob = await client.open_blob(ref, sha256_digest(LAYER), size=len(LAYER))
        return await blob.read_at(offset, length)


def _timed_read(
    proxy: fp.FaultProxy, tmp_path: Path, offset: int, length: int
) -> tuple[bytes | RegistryError, float]:
    start = time.monotonic()
    try:
        result: bytes | RegistryError = run(lambda: _read(proxy, tmp_path, offset, length))
    except RegistryError as exc:
        result = exc
    elapsed = time.monotonic() - start
    assert elapsed < BOUND, f"read took {elapsed:.2f}s, bound {BOUND:.2f}s"
    return result, elapsed


SINGLE_FAULTS = {
    "reset": fp.reset(),
    "500": fp.status(500),
    "502": fp.status(502),
    "503": fp.status(503),
    "429": fp.status(429, retry_after="1"),
    "stall": fp.stall(),
    "truncate": fp.truncate(),
    "slow": fp.slow(chunk=16 * 1024, delay=0.002),
}


@pytest.mark.parametrize("kind", sorted(SINGLE_FAULTS))
def test_one_fault_then_the_right_bytes(proxy: fp.FaultProxy, tmp_path: Path, kind: str) -> None:
    proxy.inject(SINGLE_FAULTS[kind])
    result, elapsed = _timed_read(proxy, tmp_path, 4096, 512 * 1024)
    assert result == LAYER[4096 : 4096 + 512 * 1024]
    assert proxy.applied == [SINGLE_FAULTS[kind].kind]
    if kind == "429":
        assert elapsed >= OPTIONS.retry_after_max  # Retry-After honoured (capped)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (fp.reset(), TransportError),
        (fp.status(503), ServerError),
        (fp.stall(), RegistryTimeoutError),
        (fp.truncate(), TransportError),
    ],
)
def test_persistent_fault_raises_the_right_error(
    proxy: fp.FaultProxy, tmp_path: Path, fault: fp.Fault, error: type[RegistryError]
) -> None:
    proxy.inject(*[fault] * OPTIONS.max_attempts)
    result, _ = _timed_read(proxy, tmp_path, 0, 1000)
    assert isinstance(result, error), repr(result)
    if error is TransportError:
        assert not isinstance(result, RegistryTimeoutError)
    assert len(proxy.applied) == OPTIONS.max_attempts


def test_faults_on_manifests_and_full_download(proxy: fp.FaultProxy, tmp_path: Path) -> None:
    manifests = lambda method, path: "/manifests/" in path  # noqa: E731
    # resolve_image is one GET: max_attempts - 1 faults leave its last attempt to answer.
    proxy.inject(fp.status(503, match=manifests), fp.reset(match=manifests))
    ref = parse_reference(f"{proxy.host}/{NAME}")

    async def main() -> None:
        with trio.fail_after(3 * BOUND):
            await resolve_and_download()

    async def resolve_and_download() -> None:
        async with _client(tmp_path) as client:
            image = await client.resolve_image(ref)
            assert image.manifest.layers[0].digest == sha256_digest(LAYER)
            proxy.inject(fp.truncate(match=manifests))
            again = await client.fetch_manifest(ref, image.manifest_digest)
            assert again.content == image.manifest_content
            proxy.inject(fp.truncate(), fp.reset())
            size = await client.download_blob(ref, sha256_digest(LAYER), tmp_path / "layer")
            assert size == len(LAYER) and (tmp_path / "layer").read_bytes() == LAYER

    run(main)
    assert proxy.applied == ["status", "reset", "truncate", "truncate", "reset"]


def test_random_fault_schedule(proxy: fp.FaultProxy, tmp_path: Path) -> None:
    rng = random.Random(1234)
    kinds = [
        fp.reset(),
        fp.status(500),
        fp.status(503),
        fp.status(429, "0"),
        fp.stall(),
        fp.truncate(),
        fp.slow(),
    ]
    expected_error = {
        "reset": TransportError,
        "status": ServerError,
        "stall": RegistryTimeoutError,
        "truncate": TransportError,
    }
    outcomes = {"ok": 0, "error": 0}
    for _ in range(12):
        faults = [rng.choice(kinds) for _ in range(rng.randrange(0, OPTIONS.max_attempts + 1))]
        proxy.clear()
        proxy.applied.clear()
        proxy.inject(*faults)
        offset = rng.randrange(len(LAYER) - 1)
        length = rng.randrange(1, min(len(LAYER) - offset, 300_000) + 1)
        result, _ = _timed_read(proxy, tmp_path, offset, length)
        # A slow body is still a success, so count only the faults that fail an attempt.
        failing = [f.kind for f in faults]
        first_success = next((i for i, k in enumerate(failing) if k == "slow"), None)
        failures_before = len(failing) if first_success is None else first_success
        if failures_before < OPTIONS.max_attempts:
            assert result == LAYER[offset : offset + length], (faults, result)
            consumed = min(failures_before + 1, len(faults))
            outcomes["ok"] += 1
        else:
            assert isinstance(result, expected_error[failing[OPTIONS.max_attempts - 1]]), (
                faults,
                result,
            )
            consumed = OPTIONS.max_attempts
            outcomes["error"] += 1
        assert proxy.applied == failing[:consumed]
    assert outcomes["ok"] and outcomes["error"]  # the schedule exercised both outcomes


def test_push_survives_faults_on_the_upload(proxy: fp.FaultProxy, tmp_path: Path) -> None:
    data = random_blob(3 * 1024 * 1024 + 5, seed=77)
    path = tmp_path / "layer.bin"
    path.write_bytes(data)
    patches = lambda method, path: method == "PATCH"  # noqa: E731
    puts = lambda method, path: method == "PUT"  # noqa: E731
    proxy.inject(fp.reset(match=patches), fp.status(503, match=puts))
    ref = parse_reference(f"{proxy.host}/faults/push:v1")

    async def main() -> None:
        async with _client(tmp_path) as client:
            descriptor = await client.push_blob_file(ref, path, chunk_size=1024 * 1024)
            assert descriptor.digest == sha256_digest(data)
            blob = await client.open_blob(ref, descriptor.digest)
            assert blob.size == len(data)
            assert await blob.read_at(len(data) - 100, 100) == data[-100:]

    run(main)
    assert proxy.applied == ["reset", "status"]
