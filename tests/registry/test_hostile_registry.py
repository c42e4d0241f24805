"""A registry (or a proxy, or object storage) that lies or floods: one bad answer costs one
retry, never the host for good, and never more memory than the body we asked for."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from fusefs.blob import BlobReader, forget_redirect
from registry import (
    ClientOptions,
    Credentials,
    ProtocolError,
    RangeNotSupportedError,
    RegistryError,
    parse_reference,
)
from registry.manifest import OCI_MANIFEST
from tests.registry.fake_registry import FAST, FakeRegistry, make_client

# A body abandoned at its cap leaves httpx's own nested body generators suspended; trio closes
# them when they are collected and warns. The bytes counted below show they pulled no more.
pytestmark = pytest.mark.filterwarnings("ignore:Async generator 'httpx._:ResourceWarning")

REF = parse_reference("reg.test/team/app:v1")
DATA_A = bytes(range(256)) * 400
DATA_B = bytes(reversed(range(256))) * 300
CHUNK = 64 * 1024


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn)


def two_blobs(**kwargs: Any) -> tuple[FakeRegistry, str, str]:
    fake = FakeRegistry(**kwargs)
    return fake, fake.add_blob(DATA_A), fake.add_blob(DATA_B)


def blob_gets(fake: FakeRegistry) -> list[httpx.Request]:
    return [
        r
        for r in fake.requests
        if r.method == "GET" and ("/blobs/" in r.url.path or r.url.host == "storage.test")
    ]


def full_body(data: bytes) -> Callable[[httpx.Request], httpx.Response]:
    """A server that ignores the Range header once: the whole blob with 200."""
    return lambda _request: httpx.Response(200, content=data)


class _Flood(httpx.AsyncByteStream):
    """``size`` bytes sent in 64 KiB chunks, counting how many were actually pulled."""

    def __init__(self, prefix: bytes, size: int) -> None:
        self.rest = prefix
        self.size = size
        self.pulled = 0

    def __aiter__(self) -> _Flood:
        return self

    async def __anext__(self) -> bytes:
        if self.pulled >= self.size:
            raise StopAsyncIteration
        piece = (self.rest or b"\0" * CHUNK)[:CHUNK]
        self.rest = self.rest[len(piece) :]
        self.pulled += len(piece)
        return piece

    async def aclose(self) -> None:
        pass


# -- item 3: a 200 to a Range request ----------------------------------------------------


def test_one_200_is_retried_and_leaves_the_host_usable() -> None:
    fake, digest_a, digest_b = two_blobs()
    fake.faults.append(full_body(DATA_A))

    async def main() -> tuple[int, int]:
        async with make_client(fake) as client:
            faulted = await client.open_blob(REF, digest_a, size=len(DATA_A))
            other = await client.open_blob(REF, digest_b, size=len(DATA_B))
            ok_faulted = ok_other = 0
            for i in range(20):
                if await faulted.read_at(i * 100, 100) == DATA_A[i * 100 : i * 100 + 100]:
                    ok_faulted += 1
                if await other.read_at(i * 100, 100) == DATA_B[i * 100 : i * 100 + 100]:
                    ok_other += 1
            return ok_faulted, ok_other

    assert run(main) == (20, 20)


def test_a_host_without_ranges_is_doubted_for_a_while_but_still_asked() -> None:
    fake, digest_a, _ = two_blobs(ranges=False)
    options = dataclasses.replace(FAST, max_attempts=3, no_range_ttl=0.3)

    async def main() -> None:
        async with make_client(fake, options=options) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            with pytest.raises(RangeNotSupportedError, match="ignored the Range header"):
                await blob.read_at(0, 10)
            assert len(blob_gets(fake)) == 3  # every attempt, then the error
            # Doubted now: one attempt per read, never none.
            with pytest.raises(RangeNotSupportedError):
                await blob.read_at(0, 10)
            assert len(blob_gets(fake)) == 4
            fake.ranges = True  # the proxy in front of it got fixed
            assert await blob.read_at(0, 10) == DATA_A[:10]
            assert len(blob_gets(fake)) == 5
            # Trusted again: a new 200 gets every attempt again.
            fake.ranges = False
            with pytest.raises(RangeNotSupportedError):
                await blob.read_at(0, 10)
            assert len(blob_gets(fake)) == 8

    run(main)


def test_the_doubt_about_a_host_expires() -> None:
    fake, digest_a, _ = two_blobs(ranges=False)
    options = dataclasses.replace(FAST, max_attempts=2, no_range_ttl=0.2)

    async def main() -> None:
        async with make_client(fake, options=options) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            for expected in (2, 3):  # all attempts, then the doubted single attempt
                with pytest.raises(RangeNotSupportedError):
                    await blob.read_at(0, 10)
                assert len(blob_gets(fake)) == expected
            await trio.sleep(0.3)
            with pytest.raises(RangeNotSupportedError):
                await blob.read_at(0, 10)
            assert len(blob_gets(fake)) == 5  # forgotten: all attempts again

    run(main)


# -- item 3: a redirect target that fails or serves bytes that fail verification ---------


def test_forget_redirect_sends_the_next_read_back_to_the_registry() -> None:
    fake, digest_a, _ = two_blobs(redirect_blobs_to="https://storage.test")

    async def main() -> None:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            assert await blob.read_at(0, 10) == DATA_A[:10]
            assert await blob.read_at(10, 10) == DATA_A[10:20]
            registry_gets = [r for r in blob_gets(fake) if r.url.host == "reg.test"]
            assert len(registry_gets) == 1
            assert isinstance(blob, BlobReader)
            forget_redirect(blob)  # what fusefs calls when a chunk fails verification
            assert await blob.read_at(20, 10) == DATA_A[20:30]
            registry_gets = [r for r in blob_gets(fake) if r.url.host == "reg.test"]
            assert len(registry_gets) == 2

    run(main)


def test_forget_redirect_is_optional_for_blob_readers() -> None:
    class Plain:
        size = 1
        digest = "sha256:" + "0" * 64

        async def read_at(self, offset: int, length: int) -> bytes:
            return b"x"

    forget_redirect(Plain())  # a reader without redirects: nothing to do, no error


def test_a_failing_redirect_target_is_dropped_for_a_fresh_one() -> None:
    fake, digest_a, _ = two_blobs(redirect_blobs_to="https://storage.test")
    broken_sig = fake.storage_sig

    def handler(request: httpx.Request) -> Awaitable[httpx.Response]:
        at_old_target = request.url.params.get("sig") == broken_sig
        # Once the registry redirects elsewhere, the old target fails for good.
        if request.url.host == "storage.test" and at_old_target and fake.storage_sig != "SECRET":
            fake.requests.append(request)
            return _answer(httpx.Response(503, text="SlowDown"))
        return fake.handle(request)

    async def main() -> None:
        async with make_client(fake, handler=handler) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            assert await blob.read_at(0, 10) == DATA_A[:10]
            fake.storage_sig = "NEW"  # the registry now redirects elsewhere
            assert await blob.read_at(10, 10) == DATA_A[10:20]
            assert await blob.read_at(20, 10) == DATA_A[20:30]
            old = [r for r in blob_gets(fake) if r.url.params.get("sig") == broken_sig]
            assert len(old) == 2  # the first read, and one try at the broken target

    run(main)


async def _answer(response: httpx.Response) -> httpx.Response:
    return response


# -- item 5: bodies longer than asked ------------------------------------------------------


def test_an_oversized_range_body_is_abandoned_after_one_chunk() -> None:
    fake, digest_a, _ = two_blobs()
    flood = _Flood(DATA_A[:100], 64 * 1024 * 1024)
    fake.faults.append(
        lambda r: httpx.Response(
            206, stream=flood, headers={"Content-Range": f"bytes 0-99/{len(DATA_A)}"}
        )
    )

    async def main() -> bytes:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            return await blob.read_at(0, 100)

    assert run(main) == DATA_A[:100]  # retried: the right bytes
    assert flood.pulled <= 2 * CHUNK


def test_an_announced_oversized_range_body_is_not_read_at_all() -> None:
    fake, digest_a, _ = two_blobs()
    flood = _Flood(DATA_A[:100], 64 * 1024 * 1024)
    fake.faults.append(
        lambda r: httpx.Response(
            206,
            stream=flood,
            headers={
                "Content-Range": f"bytes 0-99/{len(DATA_A)}",
                "Content-Length": str(100 + 1024**3),
            },
        )
    )

    async def main() -> bytes:
        async with make_client(fake) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            return await blob.read_at(0, 100)

    assert run(main) == DATA_A[:100]
    assert flood.pulled == 0


def test_an_oversized_manifest_is_abandoned() -> None:
    fake = FakeRegistry()
    flood = _Flood(b"{", 256 * 1024 * 1024)
    fake.faults += [lambda r: httpx.Response(200, stream=flood)] * FAST.max_attempts

    async def main() -> None:
        async with make_client(fake) as client:
            await client.fetch_manifest(REF, "v1")

    with pytest.raises(ProtocolError, match="limit"):
        run(main)
    assert flood.pulled <= 9 * 1024 * 1024  # the 8 MiB cap and one chunk, not 256 MiB


def test_an_oversized_config_is_abandoned_at_its_descriptor_size() -> None:
    fake, digest_a, _ = two_blobs()
    flood = _Flood(DATA_A, 256 * 1024 * 1024)
    fake.faults.append(lambda r: httpx.Response(200, stream=flood))

    async def main() -> None:
        async with make_client(fake) as client:
            await client.fetch_blob(REF, digest_a, size=len(DATA_A))

    with pytest.raises(ProtocolError, match=f"larger than {len(DATA_A)} bytes"):
        run(main)
    assert flood.pulled <= len(DATA_A) + CHUNK


def test_an_oversized_token_answer_is_abandoned() -> None:
    fake = FakeRegistry(auth="bearer")
    fake.add_manifest(b"{}", OCI_MANIFEST, tag="v1")
    token = json.dumps({"token": "t" * 100}).encode()
    flood = _Flood(token, 256 * 1024 * 1024)

    def handler(request: httpx.Request) -> Awaitable[httpx.Response]:
        if request.url.host == "auth.test":
            return _answer(httpx.Response(200, stream=flood))
        return fake.handle(request)

    async def main() -> None:
        async with make_client(
            fake, handler=handler, credentials=Credentials("alice", "s3cret")
        ) as client:
            await client.fetch_manifest(REF, "v1")

    with pytest.raises(RegistryError, match="limit"):
        run(main)
    assert flood.pulled <= 2 * 1024 * 1024


def test_options_refuse_a_non_positive_no_range_ttl() -> None:
    with pytest.raises(ValueError, match="no_range_ttl"):
        ClientOptions(no_range_ttl=0)


# -- item 6: no URL query in our own messages ----------------------------------------------


def test_a_library_error_naming_a_presigned_url_is_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, digest_a, _ = two_blobs()

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(
            f"cannot reach {request.url}?X-Amz-Signature=c2VjcmV0", request=request
        )

    async def main() -> None:
        async with make_client(fake, handler=handler) as client:
            blob = await client.open_blob(REF, digest_a, size=len(DATA_A))
            await blob.read_at(0, 10)

    caplog.set_level("DEBUG")
    with pytest.raises(RegistryError) as info:
        run(main)
    assert "cannot reach https://reg.test/v2/team/app/blobs/" in str(info.value)
    assert "X-Amz-Signature" not in str(info.value)
    assert "X-Amz-Signature" not in caplog.text
