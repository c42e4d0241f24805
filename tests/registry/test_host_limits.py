"""A host whose answers stall holds at most ``max_requests_per_host`` requests (issue 15): the
client's pool is shared by every host, and the others must keep getting connections."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from registry._http import Engine
from registry.hosts import RegistryHost
from registry.options import ClientOptions
from tests.integration.fuse_support import trio_test


@trio_test
async def test_a_stalled_host_takes_at_most_its_share_of_requests() -> None:
    in_flight = {"a.test": 0, "b.test": 0}
    most = {"a.test": 0, "b.test": 0}

    async def answer(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        in_flight[host] += 1
        most[host] = max(most[host], in_flight[host])
        try:
            if host == "a.test":
                await trio.sleep_forever()
            return httpx.Response(200, content=b"ok")
        finally:
            in_flight[host] -= 1

    options = ClientOptions(max_requests_per_host=3, max_attempts=1, request_timeout=30)
    engine = Engine(options, None, transport_factory=lambda host: httpx.MockTransport(answer))
    stalled, healthy = RegistryHost("https://a.test/v2"), RegistryHost("https://b.test/v2")

    async def body(response: httpx.Response) -> bytes:
        return await response.aread()

    async def get(host: RegistryHost) -> bytes:
        url = f"https://{host.netloc}/v2/x/blobs/sha256:00"
        return await engine.call(host, "GET", url, body, scopes=(), what="blob")

    async def get_stalled() -> None:
        await get(stalled)  # never answered: cancelled at the end

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(get_stalled)
            await trio.testing.wait_all_tasks_blocked()
            assert in_flight["a.test"] == 3
            assert [await get(healthy) for _ in range(3)] == [b"ok"] * 3
            nursery.cancel_scope.cancel()
    assert most["a.test"] == 3
    await engine.aclose()
