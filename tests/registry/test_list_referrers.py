"""``RegistryClient.list_referrers``: the referrers API's listing, or None without the API."""

from __future__ import annotations

import httpx
import pytest
import trio

from registry import ServerError, parse_reference
from tests.registry.fake_registry import FakeRegistry, make_client, oci_error

REF = parse_reference("reg.test/app:1")
SUBJECT = "sha256:" + "5" * 64
LISTING = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'


def _list(fake: FakeRegistry, status: int) -> bytes | None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/v2/app/referrers/{SUBJECT}":
            fake.requests.append(request)
            if status == 200:
                return httpx.Response(200, content=LISTING)
            return oci_error(status, "X", "no")
        return await fake.handle(request)

    async def main() -> bytes | None:
        async with make_client(fake, handler=handler) as client:
            return await client.list_referrers(REF, SUBJECT)

    return trio.run(main)


def test_the_listing_when_the_registry_has_the_api() -> None:
    fake = FakeRegistry()
    assert _list(fake, 200) == LISTING
    assert fake.requests[-1].headers["accept"] == "application/vnd.oci.image.index.v1+json"


def test_none_when_the_route_is_unknown() -> None:
    assert _list(FakeRegistry(), 404) is None


def test_a_server_error_is_not_taken_for_a_missing_api() -> None:
    with pytest.raises(ServerError):
        _list(FakeRegistry(), 503)


def test_a_malformed_digest_is_refused_before_any_request() -> None:
    fake = FakeRegistry()

    async def main() -> None:
        async with make_client(fake) as client:
            await client.list_referrers(REF, "sha256:nope")

    with pytest.raises(ValueError):
        trio.run(main)
    assert fake.requests == []
