"""The client against an in-memory registry (httpx.MockTransport): auth, retries, errors."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from fusefs.blob import BlobReader
from registry import (
    AuthenticationError,
    AuthorizationError,
    ClientOptions,
    Credentials,
    DigestMismatchError,
    NotFoundError,
    RangeNotSatisfiableError,
    RangeNotSupportedError,
    RegistryClient,
    RegistryTimeoutError,
    ServerError,
    StaticCredentials,
    TransportError,
    parse_platform,
    parse_reference,
)
from registry.hosts import RegistryHost
from registry.manifest import OCI_INDEX, OCI_MANIFEST
from tests.registry.fake_registry import (
    FAST,
    FakeRegistry,
    FixedHosts,
    digest_of,
    make_client,
    oci_error,
)

REF = parse_reference("reg.test/team/app:v1")
DATA = bytes(range(256)) * 400  # 102400 bytes


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


def manifest_body(layer_digest: str, size: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": layer_digest,
                "size": size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": size,
                }
            ],
        }
    ).encode()


def seeded(**kwargs: Any) -> tuple[FakeRegistry, str]:
    fake = FakeRegistry(**kwargs)
    digest = fake.add_blob(DATA)
    fake.add_manifest(manifest_body(digest, len(DATA)), OCI_MANIFEST, tag="v1")
    return fake, digest


async def read(client: RegistryClient, digest: str, offset: int, length: int) -> bytes:
    blob = await client.open_blob(REF, digest)
    return await blob.read_at(offset, length)


# -- auth ---------------------------------------------------------------------------------


def test_anonymous_bearer_flow_reuses_token() -> None:
    fake, digest = seeded(auth="bearer")

    async def main() -> None:
        async with make_client(fake) as client:
            image = await client.resolve_image(REF)
            assert image.manifest.layers[0].digest == digest
            assert await read(client, digest, 10, 100) == DATA[10:110]

    run(main)
    token_requests = [r for r in fake.requests if r.url.host == "auth.test"]
    assert len(token_requests) == 1
    assert "authorization" not in token_requests[0].headers
    assert token_requests[0].url.params.get_list("scope") == ["repository:team/app:pull"]
    assert token_requests[0].url.params["service"] == "reg.test"


def test_credentialed_bearer_and_refresh_on_401() -> None:
    fake, digest = seeded(auth="bearer")

    async def main() -> None:
        async with make_client(fake, credentials=Credentials("alice", "s3cret")) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 10) == DATA[:10]
            fake.revoked_tokens.update(fake.issued_tokens)  # the registry forgets the token
            assert await blob.read_at(5, 10) == DATA[5:15]

    run(main)
    token_requests = [r for r in fake.requests if r.url.host == "auth.test"]
    assert len(token_requests) == 2
    assert token_requests[0].headers["authorization"].startswith("Basic ")
    assert token_requests[0].url.params["account"] == "alice"


def test_403_to_a_bearer_token_fetches_a_fresh_one_once() -> None:
    fake, digest = seeded(auth="bearer")
    fake.faults.append(lambda r: None)  # the first GET: 401 and the token dance
    fake.faults.append(lambda r: None)  # token
    fake.faults.append(lambda r: None)  # GET with the token: fine

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 4) == DATA[:4]
            fake.faults.append(lambda r: oci_error(403, "DENIED", "token expired"))
            assert await blob.read_at(4, 4) == DATA[4:8]
            denied = oci_error(403, "DENIED", "really denied")
            fake.faults += [lambda r: denied, lambda r: None, lambda r: denied]  # GET, token, GET
            with pytest.raises(AuthorizationError, match="really denied"):
                await blob.read_at(8, 4)

    run(main)
    assert len([r for r in fake.requests if r.url.host == "auth.test"]) == 3


def test_remote_blob_satisfies_the_fusefs_protocol() -> None:
    fake, digest = seeded()

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest)
            reader: BlobReader = blob  # checked by mypy as well as at run time
            assert isinstance(reader, BlobReader)
            assert await reader.read_at(0, 3) == DATA[:3]

    run(main)


def test_bad_password_is_an_auth_error_without_the_secret() -> None:
    fake, _digest = seeded(auth="bearer")

    async def main() -> None:
        async with make_client(fake, credentials=Credentials("alice", "wrong-pw")) as client:
            await client.resolve(REF)

    with pytest.raises(AuthenticationError) as info:
        run(main)
    assert "wrong-pw" not in str(info.value) and "wrong-pw" not in repr(info.value)
    assert "refused the configured credentials" in str(info.value)


def test_basic_auth() -> None:
    fake, digest = seeded(auth="basic")

    async def main() -> None:
        async with make_client(fake, credentials=Credentials("alice", "s3cret")) as client:
            assert await read(client, digest, 0, 5) == DATA[:5]
        async with make_client(fake) as anonymous:
            await anonymous.resolve(REF)

    with pytest.raises(AuthenticationError, match="HTTP 401"):
        run(main)


def test_auth_and_host_headers_never_go_to_redirect_target() -> None:
    fake, digest = seeded(auth="basic", redirect_blobs_to="https://storage.test")
    hosts = {"reg.test": [RegistryHost("https://reg.test/v2", headers={"X-Secret-Header": ("1",)})]}

    async def main() -> None:
        async with make_client(
            fake, credentials=Credentials("alice", "s3cret"), hosts=hosts
        ) as client:
            assert await read(client, digest, 100, 50) == DATA[100:150]

    run(main)
    storage = [r for r in fake.requests if r.url.host == "storage.test"]
    assert storage
    for request in storage:
        assert "authorization" not in request.headers
        assert "x-secret-header" not in request.headers
    assert any("authorization" in r.headers for r in fake.requests if r.url.host == "reg.test")


# -- blobs --------------------------------------------------------------------------------


def test_redirect_is_cached_and_refreshed_on_403() -> None:
    fake, digest = seeded(redirect_blobs_to="https://storage.test")

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 10) == DATA[:10]
            assert await blob.read_at(10, 10) == DATA[10:20]
            assert await blob.read_at(20, 10) == DATA[20:30]
            registry_gets = [
                r for r in fake.requests if r.method == "GET" and r.url.host == "reg.test"
            ]
            assert len(registry_gets) == 1  # later reads went straight to storage
            fake.storage_sig = "ROTATED"  # the presigned URL expires
            assert await blob.read_at(30, 10) == DATA[30:40]
            registry_gets = [
                r for r in fake.requests if r.method == "GET" and r.url.host == "reg.test"
            ]
            assert len(registry_gets) == 2

    run(main)


def test_range_read_exact_bytes_and_bounds() -> None:
    fake, digest = seeded()

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest)
            assert blob.size == len(DATA) and blob.digest == digest
            assert await blob.read_at(len(DATA) - 7, 7) == DATA[-7:]
            assert await blob.read_at(3, 0) == b""
            for offset, length in ((len(DATA) - 1, 2), (-1, 1), (0, -1)):
                with pytest.raises(RangeNotSatisfiableError):
                    await blob.read_at(offset, length)
            ranges = [r.headers["range"] for r in fake.requests if "range" in r.headers]
            assert ranges == [f"bytes={len(DATA) - 7}-{len(DATA) - 1}"]

    run(main)


def test_416_from_server() -> None:
    fake, digest = seeded()

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA) * 2)  # a wrong size
            await blob.read_at(len(DATA) + 5, 5)

    with pytest.raises(RangeNotSatisfiableError, match="RANGE_INVALID"):
        run(main)


class _Tripwire(httpx.AsyncByteStream):
    def __init__(self) -> None:
        self.iterated = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.iterated = True
        yield b"x" * 100

    async def aclose(self) -> None:
        self.closed = True


def test_200_to_a_ranged_get_is_not_consumed() -> None:
    fake, digest = seeded()
    attempts = FAST.max_attempts
    streams = [_Tripwire() for _ in range(attempts + 1)]
    fake.faults.append(lambda r: None)  # HEAD passes
    fake.faults += [lambda r, s=s: httpx.Response(200, stream=s) for s in streams]

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest)
            with pytest.raises(RangeNotSupportedError, match="ignored the Range header"):
                await blob.read_at(0, 10)
            count = len(fake.requests)
            with pytest.raises(RangeNotSupportedError):
                await blob.read_at(0, 10)
            assert len(fake.requests) == count + 1  # doubted now: one attempt, not none

    run(main)
    assert not any(s.iterated for s in streams) and all(s.closed for s in streams)


def test_truncated_body_is_retried() -> None:
    fake, digest = seeded()
    fake.faults.append(lambda r: None)  # HEAD
    fake.faults.append(
        lambda r: httpx.Response(
            206, content=DATA[:5], headers={"Content-Range": f"bytes 0-9/{len(DATA)}"}
        )
    )

    async def main() -> None:
        async with make_client(fake) as client:
            assert await read(client, digest, 0, 10) == DATA[:10]

    run(main)
    assert sum(1 for r in fake.requests if "range" in r.headers) == 2


def test_wrong_content_range_is_retried() -> None:
    fake, digest = seeded()
    fake.faults.append(lambda r: None)
    fake.faults.append(
        lambda r: httpx.Response(
            206, content=DATA[:10], headers={"Content-Range": f"bytes 0-9/{len(DATA)}"}
        )
    )

    async def main() -> None:
        async with make_client(fake) as client:
            assert await read(client, digest, 50, 10) == DATA[50:60]

    run(main)


# -- retries and errors -------------------------------------------------------------------


def test_5xx_and_429_are_retried_honouring_retry_after() -> None:
    fake, _digest = seeded()
    fake.faults += [
        lambda r: oci_error(503, "UNAVAILABLE", "busy"),
        lambda r: oci_error(429, "TOOMANYREQUESTS", "slow down", {"Retry-After": "1"}),
    ]
    options = ClientOptions(request_timeout=2, backoff_initial=0.001, retry_after_max=0.3)

    async def main() -> None:
        async with make_client(fake, options=options) as client:
            start = time.monotonic()
            assert (await client.resolve(REF)).digest.startswith("sha256:")
            assert 0.3 <= time.monotonic() - start < 2

    run(main)


def test_retries_run_out_with_the_registry_message() -> None:
    fake, _digest = seeded()
    fake.faults += [lambda r: oci_error(503, "UNAVAILABLE", "maintenance window")] * 10

    async def main() -> None:
        async with make_client(fake) as client:
            await client.resolve(REF)

    with pytest.raises(ServerError, match="maintenance window") as info:
        run(main)
    assert info.value.status == 503
    assert info.value.details[0].code == "UNAVAILABLE"
    assert len(fake.requests) == FAST.max_attempts


def test_connection_errors_retried_then_chained() -> None:
    fake, _digest = seeded()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    fake.faults += [refuse, refuse]

    async def main() -> None:
        async with make_client(fake) as client:
            await client.resolve(REF)
        fake.faults += [refuse] * 10
        async with make_client(fake) as client:
            await client.resolve(REF)

    with pytest.raises(TransportError) as info:
        run(main)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


def test_timeout_is_bounded() -> None:
    fake, _digest = seeded(delay=5)
    options = ClientOptions(request_timeout=0.2, max_attempts=2, backoff_initial=0.001)

    async def main() -> None:
        async with make_client(fake, options=options) as client:
            await client.resolve(REF)

    start = time.monotonic()
    with pytest.raises(RegistryTimeoutError):
        run(main)
    assert time.monotonic() - start < 2


def test_not_found_carries_oci_code() -> None:
    fake, _digest = seeded()

    async def main() -> None:
        async with make_client(fake) as client:
            await client.resolve(parse_reference("reg.test/team/app:missing"))

    with pytest.raises(NotFoundError, match="MANIFEST_UNKNOWN"):
        run(main)


def test_manifest_digest_is_verified() -> None:
    fake, digest = seeded()
    body = manifest_body(digest, len(DATA))
    manifest_digest = digest_of(body)
    fake.manifests[manifest_digest] = (body.replace(b"team", b"evil", 0) + b" ", OCI_MANIFEST)

    async def main() -> None:
        async with make_client(fake) as client:
            await client.fetch_manifest(REF, manifest_digest)

    with pytest.raises(DigestMismatchError):
        run(main)


def test_resolve_falls_back_to_get_when_head_says_too_little() -> None:
    fake, _digest = seeded()
    fake.faults.append(lambda r: httpx.Response(200))  # HEAD without Docker-Content-Digest

    async def main() -> None:
        async with make_client(fake) as client:
            descriptor = await client.resolve(REF)
            assert descriptor.digest == digest_of(fake.manifests["v1"][0])

    run(main)
    assert [r.method for r in fake.requests] == ["HEAD", "GET"]


def test_index_platform_selection() -> None:
    fake, digest = seeded()
    arm = manifest_body(digest, len(DATA)).replace(b'"schemaVersion": 2', b'"schemaVersion": 2 ')
    amd = manifest_body(digest, len(DATA))
    arm_digest = fake.add_manifest(arm, OCI_MANIFEST)
    amd_digest = fake.add_manifest(amd, OCI_MANIFEST)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": amd_digest,
                    "size": len(amd),
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": arm_digest,
                    "size": len(arm),
                    "platform": {"os": "linux", "architecture": "arm64"},
                },
            ],
        }
    ).encode()
    index_digest = fake.add_manifest(index, OCI_INDEX, tag="multi")

    async def main() -> None:
        async with make_client(fake) as client:
            ref = parse_reference("reg.test/team/app:multi")
            image = await client.resolve_image(ref, parse_platform("linux/arm64"))
            assert (image.digest, image.manifest_digest) == (index_digest, arm_digest)
            assert image.index is not None and str(image.platform) == "linux/arm64"
            assert (image.target_content, image.manifest_content) == (index, arm)
            assert image.media_type == OCI_INDEX

    run(main)
    # One GET by tag, one by the chosen digest: no HEAD first (the body is needed anyway).
    asked = [(r.method, r.url.path.rsplit("/", 1)[-1]) for r in fake.requests
             if "/manifests/" in r.url.path]
    assert asked == [("GET", "multi"), ("GET", arm_digest)]


def test_resolving_a_manifest_is_one_get_by_tag() -> None:
    fake, _digest = seeded()

    async def main() -> None:
        async with make_client(fake) as client:
            image = await client.resolve_image(REF)
            assert image.index is None and image.manifest_content == image.target_content
            assert image.digest == image.manifest_digest == digest_of(fake.manifests["v1"][0])

    run(main)
    assert [r.method for r in fake.requests if "/manifests/" in r.url.path] == ["GET"]


def test_mirror_fails_then_upstream_answers() -> None:
    fake, _digest = seeded()
    hosts = {
        "reg.test": [
            RegistryHost(
                "https://mirror.test/v2",
                capabilities=frozenset({"pull", "resolve"}),
                is_mirror=True,
            ),
            RegistryHost("https://reg.test/v2"),
        ]
    }

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "mirror.test":
            fake.requests.append(request)
            return oci_error(500, "INTERNAL", "mirror broken")
        return await fake.handle(request)

    async def main() -> None:
        async with make_client(fake, hosts=hosts, handler=handler) as client:
            image = await client.resolve_image(REF)
            blob = await client.open_blob(REF, image.manifest.layers[0].digest)
            assert await blob.read_at(1, 3) == DATA[1:4]

    run(main)
    assert any(r.url.host == "mirror.test" for r in fake.requests)


# -- whole blobs and push -----------------------------------------------------------------


def test_download_verifies_digest(tmp_path: Path) -> None:
    fake, digest = seeded()

    async def main() -> None:
        async with make_client(fake) as client:
            size = await client.download_blob(REF, digest, tmp_path / "blob")
            assert size == len(DATA)
            assert (tmp_path / "blob").read_bytes() == DATA
            fake.blobs[digest] = DATA[:-1] + b"\x00"
            with pytest.raises(DigestMismatchError):
                await client.download_blob(REF, digest, tmp_path / "bad")
            small = fake.add_blob(b"config")
            assert await client.fetch_blob(REF, small) == b"config"
            with pytest.raises(DigestMismatchError):
                await client.fetch_blob(REF, digest)

    run(main)
    assert not (tmp_path / "bad").exists()
    assert not (tmp_path / "bad.partial").exists()


def test_push_monolithic_chunked_mount_and_manifest() -> None:
    fake = FakeRegistry()
    blob_a, blob_b = b"a" * 1000, b"b" * 2500

    async def main() -> None:
        async with make_client(fake) as client:
            desc = await client.push_blob(REF, blob_a)
            assert fake.blobs[desc.digest] == blob_a
            desc_b = await client.push_blob(REF, blob_b, chunk_size=1000)
            assert fake.blobs[desc_b.digest] == blob_b
            patches = [r for r in fake.requests if r.method == "PATCH"]
            assert [r.headers["content-range"] for r in patches] == [
                "0-999",
                "1000-1999",
                "2000-2499",
            ]
            before = len(fake.requests)
            await client.push_blob(REF, blob_a)  # already there: one HEAD
            assert [r.method for r in fake.requests[before:]] == ["HEAD"]
            other = parse_reference("reg.test/other/app:v1")
            fake.faults.append(lambda r: oci_error(404, "BLOB_UNKNOWN", "not in this repository"))
            await client.push_blob(other, blob_b, mount_from=REF)
            posts = [r for r in fake.requests if r.method == "POST"]
            assert posts[-1].url.params["mount"] == desc_b.digest
            assert posts[-1].url.params["from"] == "team/app"
            body = manifest_body(desc.digest, len(blob_a))
            digest = await client.push_manifest(REF, body, OCI_MANIFEST)
            assert fake.manifests["v1"] == (body, OCI_MANIFEST) and digest == digest_of(body)

    run(main)


def test_push_blob_file_in_chunks_restarts_a_failed_session(tmp_path: Path) -> None:
    fake = FakeRegistry()
    data = bytes(range(256)) * 40  # 10240 bytes
    path = tmp_path / "layer"
    path.write_bytes(data)
    failed = [False]

    async def handler(request: httpx.Request) -> httpx.Response:
        patches = [r for r in fake.requests if r.method == "PATCH"]
        if request.method == "PATCH" and len(patches) == 1 and not failed[0]:
            failed[0] = True
            fake.requests.append(request)
            return oci_error(500, "INTERNAL", "disk hiccup")
        return await fake.handle(request)

    async def main() -> None:
        async with make_client(fake, handler=handler) as client:
            descriptor = await client.push_blob_file(REF, path, chunk_size=4096)
            assert descriptor.digest == digest_of(data) and descriptor.size == len(data)

    run(main)
    assert fake.blobs[digest_of(data)] == data
    assert [r.method for r in fake.requests].count("POST") == 2  # a fresh session after the 500


def test_blob_reads_fail_over_to_the_next_host_and_stay_there() -> None:
    fake, digest = seeded()
    hosts = {
        "reg.test": [
            RegistryHost("https://mirror.test/v2", frozenset({"pull"}), is_mirror=True),
            RegistryHost("https://reg.test/v2"),
        ]
    }
    mirror_requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "mirror.test":
            mirror_requests.append(request)
            return oci_error(503, "UNAVAILABLE", "mirror down")
        return await fake.handle(request)

    async def main() -> None:
        async with make_client(fake, hosts=hosts, handler=handler) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))  # no HEAD: mirror first
            assert await blob.read_at(7, 9) == DATA[7:16]
            asked = len(mirror_requests)
            assert asked == 1  # a mirror gets one attempt: the next host is the retry
            assert await blob.read_at(20, 5) == DATA[20:25]
            assert len(mirror_requests) == asked  # the mirror is in back-off now

    run(main)


class _Drip(httpx.AsyncByteStream):
    """A body that arrives in pieces with pauses: each gap is short, the whole is slow."""

    def __init__(self, data: bytes, pause: float) -> None:
        self.data, self.pause = data, pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 1000):
            await trio.sleep(self.pause)
            yield self.data[start : start + 1000]


def test_download_is_bounded_in_total(tmp_path: Path) -> None:
    fake, digest = seeded()
    options = ClientOptions(
        request_timeout=0.3, max_attempts=2, backoff_initial=0.001, min_download_rate=1e9
    )

    def drip(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, stream=_Drip(DATA[:5000], 0.1), headers={"Content-Length": "5000"}
        )

    fake.faults += [drip, drip]

    async def main() -> None:
        async with make_client(fake, options=options) as client:
            await client.download_blob(REF, digest, tmp_path / "blob")

    start = time.monotonic()
    with pytest.raises(RegistryTimeoutError):
        run(main)
    assert time.monotonic() - start < 2
    assert not (tmp_path / "blob.partial").exists()


def test_concurrent_first_reads_fetch_one_token() -> None:
    fake, digest = seeded(auth="bearer")
    fake.delay = 0.01  # let the reads overlap

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await blob.read_at(i * 100, 100)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            assert all(results[i] == DATA[i * 100 : i * 100 + 100] for i in range(20))

    run(main)
    assert len([r for r in fake.requests if r.url.host == "auth.test"]) == 1


class _CountingCredentials:
    def __init__(self, passwords: list[str]) -> None:
        self.passwords = passwords
        self.lookups = 0

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        self.lookups += 1
        return Credentials("alice", self.passwords[min(self.lookups, len(self.passwords)) - 1])


def test_rotated_credentials_are_picked_up_after_a_refusal() -> None:
    fake, digest = seeded(auth="basic")
    provider = _CountingCredentials(["old-password", "s3cret"])
    config = FixedHosts({fake.host: [RegistryHost(f"https://{fake.host}/v2")]})
    transport = httpx.MockTransport(fake.handle)

    async def main() -> None:
        client = RegistryClient(config, provider, FAST, _transport_factory=lambda _h: transport)
        async with client:
            with pytest.raises(AuthenticationError):
                await client.resolve(REF)  # the old password is refused...
            assert (await client.resolve(REF)).digest  # ...and looked up again afterwards
            assert await read(client, digest, 0, 3) == DATA[:3]

    run(main)
    assert provider.lookups == 2


class _PerRepository:
    """Credentials that differ by repository on one host, as a daemon given two pulls' holds."""

    def __init__(self, by_repository: dict[str, Credentials]) -> None:
        self.by_repository = by_repository
        self.asked: list[tuple[str, str]] = []

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        self.asked.append((host, repository))
        return self.by_repository.get(repository)


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_credentials_are_looked_up_per_repository(auth: str) -> None:
    """Issue 15 item 7: the provider is asked for the request's repository, so two
    repositories of one host each get their own set (and a wrong one stays with its own)."""
    fake, digest = seeded(auth=auth)
    other = parse_reference("reg.test/other/app:v1")
    provider = _PerRepository({
        "team/app": Credentials("alice", "s3cret"),
        "other/app": Credentials("alice", "wrong"),
    })
    config = FixedHosts({fake.host: [RegistryHost(f"https://{fake.host}/v2")]})
    transport = httpx.MockTransport(fake.handle)

    async def main() -> None:
        client = RegistryClient(config, provider, FAST, _transport_factory=lambda _h: transport)
        async with client:
            assert (await client.resolve(REF)).digest
            with pytest.raises(AuthenticationError):
                await client.resolve(other)
            assert await read(client, digest, 0, 3) == DATA[:3]  # team/app still works

    run(main)
    assert ("reg.test", "team/app") in provider.asked
    assert ("reg.test", "other/app") in provider.asked


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_check_access_uses_only_the_new_credentials(auth: str) -> None:
    """A client's cached token or credentials never make a wrong set look accepted."""
    fake, _digest = seeded(auth=auth)

    async def main() -> None:
        async with make_client(fake, credentials=Credentials("alice", "s3cret")) as client:
            assert (await client.resolve(REF)).digest  # warm: challenge, token, credentials
            wrong = client.with_credentials(StaticCredentials({fake.host: Credentials("alice", "x")}))
            async with wrong:
                with pytest.raises(AuthenticationError):
                    await wrong.check_access(fake.host, REF)
                with pytest.raises(AuthenticationError):
                    await wrong.check_access(fake.host)
            right = client.with_credentials(
                StaticCredentials({fake.host: Credentials("alice", "s3cret")})
            )
            async with right:
                await right.check_access(fake.host, REF)
                await right.check_access(fake.host)

    run(main)


class _CachingProvider:
    """A provider that keeps its source's answer until told to forget it, like a credential
    provider plugin's cache: only ``forget`` makes it ask the source again."""

    def __init__(self, source: list[str]) -> None:
        self.source = source  # the password the source gives now, at [0]
        self.cached: Credentials | None = None
        self.forgotten: list[tuple[str, str]] = []

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        if self.cached is None:
            self.cached = Credentials("alice", self.source[0])
        return self.cached

    def forget(self, host: str, repository: str = "") -> None:
        self.forgotten.append((host, repository))
        self.cached = None


def _client_with(fake: FakeRegistry, provider: object) -> RegistryClient:
    config = FixedHosts({fake.host: [RegistryHost(f"https://{fake.host}/v2")]})
    transport = httpx.MockTransport(fake.handle)
    return RegistryClient(config, provider, FAST,  # type: ignore[arg-type]
                          _transport_factory=lambda _h: transport)


def test_a_refused_password_makes_a_caching_provider_ask_its_source_again() -> None:
    """Issue 10: a 401 to credentials re-resolves them past the provider's own cache, and the
    read that met it succeeds with the rotated password, without failing first."""
    fake, digest = seeded(auth="basic")
    provider = _CachingProvider(["s3cret"])

    async def main() -> None:
        async with _client_with(fake, provider) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 4) == DATA[:4]
            fake.password = provider.source[0] = "rotated-pw"
            assert await blob.read_at(4, 4) == DATA[4:8]

    run(main)
    assert provider.forgotten == [(fake.host, "team/app")]


def test_an_anonymous_challenge_does_not_empty_the_providers_cache() -> None:
    fake, digest = seeded(auth="basic")
    provider = _CachingProvider(["s3cret"])

    async def main() -> None:
        async with _client_with(fake, provider) as client:
            assert await read(client, digest, 0, 4) == DATA[:4]

    run(main)
    assert provider.forgotten == []  # the first 401 only asked for credentials


def test_a_token_server_refusal_looks_the_credentials_up_again_once() -> None:
    """The registry never answers 401 here: the token expired, and the token server refuses
    the password it was given before the rotation. One fresh lookup, then the read works."""
    fake, digest = seeded(auth="bearer", token_lifetime=1)  # kept for half a second
    provider = _CachingProvider(["s3cret"])

    async def main() -> None:
        async with _client_with(fake, provider) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 4) == DATA[:4]
            fake.password = provider.source[0] = "rotated-pw"
            await trio.sleep(0.6)
            assert await blob.read_at(4, 4) == DATA[4:8]
            fake.password = "rotated-again"  # the source does not know it: refused, once more
            await trio.sleep(0.6)
            with pytest.raises(AuthenticationError, match="refused the configured credentials"):
                await blob.read_at(8, 4)

    run(main)
    assert len(provider.forgotten) == 2


def test_a_403_to_basic_credentials_is_retried_once_with_a_fresh_lookup() -> None:
    fake, digest = seeded(auth="basic")
    provider = _CachingProvider(["s3cret"])

    async def main() -> None:
        async with _client_with(fake, provider) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 4) == DATA[:4]
            fake.faults.append(lambda r: oci_error(403, "DENIED", "rotated away"))
            assert await blob.read_at(4, 4) == DATA[4:8]

    run(main)
    assert provider.forgotten == [(fake.host, "team/app")]


def test_credentials_valid_for_less_than_the_ttl_are_looked_up_again_sooner() -> None:
    fake, digest = seeded(auth="basic")
    lookups: list[str] = []

    class ShortLived:
        async def credentials_for(self, host: str, repository: str = "") -> Credentials:
            lookups.append(repository)
            return Credentials("alice", "s3cret", valid_for=0.2)

    async def main() -> None:
        async with _client_with(fake, ShortLived()) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(0, 4) == DATA[:4]
            asked = len(lookups)
            assert await blob.read_at(4, 4) == DATA[4:8]
            assert len(lookups) == asked  # still valid: reused
            await trio.sleep(0.3)
            assert await blob.read_at(8, 4) == DATA[8:12]
            assert len(lookups) == asked + 1

    run(main)
