"""Mirrors from hosts.toml: ``ns=``, single ranges only, fallback, first-byte deadline, back-off."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from registry import ClientOptions, RegistryTimeoutError, parse_hosts_toml, parse_reference
from registry._http import Engine
from registry.health import HostHealth
from registry.hosts import RegistryHost, parse_go_duration, with_namespace
from registry.manifest import OCI_MANIFEST
from tests.registry.fake_registry import FAST, FakeRegistry, make_client
from tests.registry.test_client_mock import DATA, REF, manifest_body

MIRROR = RegistryHost("https://mirror.test/v2", frozenset({"pull", "resolve"}), is_mirror=True)
ORIGIN = RegistryHost("https://reg.test/v2")
HOSTS = {"reg.test": [MIRROR, ORIGIN]}
SINGLE_RANGE = re.compile(r"bytes=\d+-\d+")


def seeded(**kwargs: Any) -> tuple[FakeRegistry, str]:
    fake = FakeRegistry(**kwargs)
    digest = fake.add_blob(DATA)
    fake.add_manifest(manifest_body(digest, len(DATA)), OCI_MANIFEST, tag="v1")
    return fake, digest


def run(fn: Callable[[], Awaitable[Any]], clock: trio.abc.Clock | None = None) -> Any:
    return trio.run(fn, clock=clock)


Route = Callable[[httpx.Request], Awaitable[httpx.Response]]


def split_handler(fake: FakeRegistry, mirror: Route | None = None) -> tuple[
    Route, list[httpx.Request]
]:
    """Requests to mirror.test go to ``mirror`` (default: the same content) and are recorded."""
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "mirror.test":
            seen.append(request)
            if mirror is not None:
                return await mirror(request)
        return await fake.handle(request)

    return handler, seen


# -- ns= --------------------------------------------------------------------------------


def test_every_request_to_a_mirror_names_the_registry_and_none_to_the_origin(
    tmp_path: Path,
) -> None:
    fake, digest = seeded(auth="bearer")
    handler, mirror_requests = split_handler(fake)

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler) as client:
            await client.resolve(REF)
            image = await client.resolve_image(REF)
            blob = await client.open_blob(REF, image.manifest.layers[0].digest)  # HEAD
            assert await blob.read_at(5, 10) == DATA[5:15]
            assert await client.fetch_blob(REF, digest) == DATA
            await client.download_blob(REF, digest, tmp_path / "blob")

    run(main)
    # The first answer was a 401 challenge; the request sent again with the token keeps ns.
    assert mirror_requests[0].url.params.get("ns") == "reg.test"
    assert any("authorization" in r.headers for r in mirror_requests)
    kinds = {(r.method, r.url.path.split("/")[-2]) for r in mirror_requests}
    assert {("HEAD", "manifests"), ("GET", "manifests"), ("HEAD", "blobs"), ("GET", "blobs")} <= kinds
    assert [r for r in mirror_requests if r.url.params.get("ns") != "reg.test"] == []
    # The token server is not the mirror: it is asked as containerd asks it, without ns.
    token_requests = [r for r in fake.requests if r.url.host == "auth.test"]
    assert token_requests and all("ns" not in r.url.params for r in token_requests)
    origin_requests = [r for r in fake.requests if r.url.host == "reg.test"]
    assert origin_requests == []  # the mirror served everything


def test_ns_goes_to_hosts_other_than_the_registry_as_in_containerd() -> None:
    text = """
server = "https://registry-1.docker.io"
[host."https://mirror.gcr.io"]
  capabilities = ["pull", "resolve"]
[host."https://docker.io"]
[host."https://proxy.test/v2/hub"]
  override_path = true
"""
    hosts = with_namespace(parse_hosts_toml(text, "docker.io", base_dir=Path("/x")), "docker.io")
    assert [h.namespace for h in hosts] == ["docker.io", None, "docker.io", None]
    assert hosts[2].url("library/busybox/manifests/latest") == (
        "https://proxy.test/v2/hub/library/busybox/manifests/latest?ns=docker.io"
    )
    assert hosts[3].url("library/busybox/manifests/latest") == (
        "https://registry-1.docker.io/v2/library/busybox/manifests/latest"
    )
    # A server other than the registry is a proxy too: containerd compares host names.
    (elsewhere,) = with_namespace(
        parse_hosts_toml('server = "https://other.test"', "reg.test", base_dir=Path("/x")),
        "reg.test",
    )
    assert elsewhere.url("a/blobs/sha256:00", {"x": "1"}).endswith("?x=1&ns=reg.test")


def test_upload_to_a_mirror_names_the_registry_on_every_step() -> None:
    fake = FakeRegistry()
    hosts = {"reg.test": [RegistryHost("https://mirror.test/v2", is_mirror=True)]}
    handler, mirror_requests = split_handler(fake)

    async def main() -> None:
        async with make_client(fake, hosts=hosts, handler=handler) as client:
            await client.push_blob(REF, b"layer bytes")
            await client.push_manifest(REF, manifest_body(fake.add_blob(b"x"), 1), OCI_MANIFEST)

    run(main)
    assert {r.method for r in mirror_requests} == {"HEAD", "POST", "PUT"}
    assert all(r.url.params.get("ns") == "reg.test" for r in mirror_requests)
    puts = [r for r in mirror_requests if r.method == "PUT" and "/uploads/" in r.url.path]
    assert puts and puts[0].url.params.get_list("ns") == ["reg.test"]


# -- ranges -----------------------------------------------------------------------------


def test_reads_send_a_mirror_only_single_ranges() -> None:
    fake, digest = seeded()
    handler, mirror_requests = split_handler(fake)

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))
            async with trio.open_nursery() as nursery:
                for offset in range(0, len(DATA), 7000):
                    nursery.start_soon(blob.read_at, offset, min(3000, len(DATA) - offset))

    run(main)
    ranges = [r.headers["range"] for r in mirror_requests]
    assert len(ranges) == len(range(0, len(DATA), 7000))
    assert all(SINGLE_RANGE.fullmatch(value) for value in ranges), ranges


def test_a_multi_range_request_is_refused_before_it_reaches_a_mirror() -> None:
    sent: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(206, content=b"ab")

    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    engine = Engine(FAST, None, lambda _host: transport)

    async def answer(response: httpx.Response) -> int:
        return response.status_code

    async def main() -> None:
        url = MIRROR.url("team/app/blobs/sha256:00")
        with pytest.raises(ValueError, match="multi-range"):
            await engine.call(
                MIRROR, "GET", url, answer, scopes=(), what="t",
                headers={"Range": "bytes=0-0,5-5"},
            )
        assert await engine.call(
            ORIGIN, "GET", ORIGIN.url("a"), answer, scopes=(), what="t",
            headers={"Range": "bytes=0-0,5-5"},
        ) == 206
        await engine.aclose()

    run(main)
    assert [r.url.host for r in sent] == ["reg.test"]


# -- fallback, first-byte deadline, back-off ----------------------------------------------


def test_a_mirror_that_never_answers_falls_back_within_the_first_byte_deadline() -> None:
    fake, digest = seeded()
    options = ClientOptions(
        connect_timeout=60, read_timeout=60, request_timeout=60, mirror_first_byte_timeout=2.0
    )

    async def silent(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    handler, mirror_requests = split_handler(fake, silent)
    elapsed: list[float] = []

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler, options=options) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))
            start = trio.current_time()
            assert await blob.read_at(100, 50) == DATA[100:150]
            elapsed.append(trio.current_time() - start)
            # During the back-off, reads go straight to the origin.
            start = trio.current_time()
            assert await blob.read_at(200, 50) == DATA[200:250]
            elapsed.append(trio.current_time() - start)
            with pytest.raises(RegistryTimeoutError, match="no answer from mirror"):
                await client._engine.call(
                    MIRROR, "GET", MIRROR.url("x"), _status, scopes=(), what="t"
                )

    # Virtual time: the deadline is what is measured, not this machine's speed.
    run(main, trio.testing.MockClock(autojump_threshold=0))
    assert len(mirror_requests) == 2  # one read's attempt, then the direct call
    assert 2.0 <= elapsed[0] < 3.0  # one first-byte deadline, not the 60 s request timeout
    assert elapsed[1] < 0.5


async def _status(response: httpx.Response) -> int:
    return response.status_code


def test_a_mirror_dying_mid_run_then_recovering() -> None:
    fake, digest = seeded()
    state = {"dead": False}

    async def mirror(request: httpx.Request) -> httpx.Response:
        if state["dead"]:
            raise httpx.ConnectError("connection refused", request=request)
        return await fake.handle(request)

    handler, mirror_requests = split_handler(fake, mirror)

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler) as client:
            client._engine.health = HostHealth(5.0, 60.0, clock)
            blob = await client.open_blob(REF, digest, size=len(DATA))
            assert await blob.read_at(0, 10) == DATA[0:10]
            assert not [r for r in fake.requests if r.url.host == "reg.test"]
            state["dead"] = True
            assert await blob.read_at(10, 10) == DATA[10:20]  # fell back to the origin
            asked = len(mirror_requests)
            for offset in range(20, 100, 10):
                assert await blob.read_at(offset, 10) == DATA[offset : offset + 10]
            assert len(mirror_requests) == asked  # skipped during the back-off
            state["dead"] = False
            clock.now += 5.0
            assert await blob.read_at(100, 10) == DATA[100:110]  # the probe, served by it
            assert len(mirror_requests) == asked + 1
            origin_reads = len([r for r in fake.requests if r.url.host == "reg.test"])
            assert await blob.read_at(110, 10) == DATA[110:120]
            assert len(mirror_requests) == asked + 2  # back on the mirror
            assert len([r for r in fake.requests if r.url.host == "reg.test"]) == origin_reads

    run(main)


def test_wrong_bytes_from_a_mirror_put_it_in_backoff() -> None:
    fake, digest = seeded()

    async def lying(request: httpx.Request) -> httpx.Response:
        answer = await fake.handle(request)
        if answer.status_code == 206:
            body = bytes(b ^ 0xFF for b in answer.content)
            return httpx.Response(206, content=body, headers=dict(answer.headers))
        return answer

    handler, mirror_requests = split_handler(fake, lying)

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))
            served = await blob.read_at(0, 16)
            assert served != DATA[0:16]  # the registry client cannot tell; fusefs's check does
            blob.forget_redirect()  # what fusefs calls when a chunk fails verification
            assert client._engine.health.in_backoff("mirror.test")
            assert await blob.read_at(0, 16) == DATA[0:16]

    run(main)
    assert len(mirror_requests) == 1


def test_a_mirror_without_the_blob_is_asked_after_the_origin_for_that_blob() -> None:
    fake, digest = seeded()

    async def empty(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]})

    handler, mirror_requests = split_handler(fake, empty)

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))
            assert await blob.read_at(0, 8) == DATA[0:8]
            assert await blob.read_at(8, 8) == DATA[8:16]
            assert not client._engine.health.in_backoff("mirror.test")

    run(main)
    assert len(mirror_requests) == 1


# -- hosts.toml: IPv6 and dial_timeout -----------------------------------------------------


def test_ipv6_literal_hosts_in_keys_and_server() -> None:
    text = """
server = "http://[::1]:5000"
dial_timeout = "1s"
[host."http://[::1]:5001"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "250ms"
[host."[fd00::7]:5002"]
"""
    hosts = with_namespace(parse_hosts_toml(text, "[::1]:5000", base_dir=Path("/x")), "[::1]:5000")
    assert [h.api_url for h in hosts] == [
        "http://[::1]:5001/v2",
        "https://[fd00::7]:5002/v2",
        "http://[::1]:5000/v2",
    ]
    assert [h.netloc for h in hosts] == ["[::1]:5001", "[fd00::7]:5002", "[::1]:5000"]
    assert [h.dial_timeout for h in hosts] == [0.25, None, 1.0]
    url = hosts[0].url("app/blobs/sha256:00")
    assert url == "http://[::1]:5001/v2/app/blobs/sha256:00?ns=%5B%3A%3A1%5D%3A5000"
    assert httpx.URL(url).params["ns"] == "[::1]:5000"
    assert hosts[2].namespace is None
    assert parse_reference("[::1]:5000/app:v1").domain == "[::1]:5000"


def test_dial_timeout_bounds_connecting_to_its_host_only() -> None:
    connect_timeouts: dict[str, float] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        connect_timeouts[request.url.host] = request.extensions["timeout"]["connect"]
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    engine = Engine(FAST, None, lambda _host: transport)
    quick = RegistryHost("https://quick.test/v2", is_mirror=True, dial_timeout=0.25)

    async def main() -> None:
        for host in (quick, ORIGIN):
            await engine.call(host, "GET", host.url(""), _status, scopes=(), what="t")
        await engine.aclose()

    run(main)
    assert connect_timeouts == {"quick.test": 0.25, "reg.test": FAST.connect_timeout}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5s", 1.5), ("0", 0.0), ("2h", 7200.0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "-1s", "1x", "s", "1s ", "10 s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_a_cold_pull_through_mirror_is_asked_again_for_the_blob_after_a_while() -> None:
    """distribution's proxy answers a range of a blob it has not stored yet with the whole
    blob: that read goes to the origin, the mirror keeps its health and, for that blob, is
    asked again once ``blob_miss_ttl`` has passed."""
    fake, digest = seeded()
    stored = {"yet": False}

    async def pull_through(request: httpx.Request) -> httpx.Response:
        if not stored["yet"] and request.method == "GET" and "/blobs/" in request.url.path:
            stored["yet"] = True  # it stores the blob while it streams it whole
            return httpx.Response(200, content=DATA)
        return await fake.handle(request)

    handler, mirror_requests = split_handler(fake, pull_through)
    options = ClientOptions(
        connect_timeout=2, read_timeout=2, request_timeout=2, backoff_initial=0.001,
        backoff_max=0.01, blob_miss_ttl=0.2,
    )

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler, options=options) as client:
            blob = await client.open_blob(REF, digest, size=len(DATA))
            assert await blob.read_at(0, 8) == DATA[0:8]  # from the origin
            assert not client._engine.health.in_backoff("mirror.test")
            assert await blob.read_at(8, 8) == DATA[8:16]  # still the origin, for this blob
            assert len(mirror_requests) == 1
            await trio.sleep(0.3)
            assert await blob.read_at(16, 8) == DATA[16:24]  # the mirror again, warm now
            assert len(mirror_requests) == 2
            assert mirror_requests[-1].headers["range"] == "bytes=16-23"

    run(main)
    origin_ranges = [r for r in fake.requests if r.url.host == "reg.test" and "range" in r.headers]
    assert [r.headers["range"] for r in origin_ranges] == ["bytes=0-7", "bytes=8-15"]


def test_referrers_requests_to_a_mirror_name_the_registry_too() -> None:
    """The referrers API (with its artifactType filter) and the referrers tag fallback: a
    mirror learns which registry is meant from ``ns`` on these as on every request."""
    fake, _ = seeded()
    handler, mirror_requests = split_handler(fake)

    async def main() -> None:
        async with make_client(fake, hosts=HOSTS, handler=handler) as client:
            image = await client.resolve_image(REF)
            await client.fetch_referrers(REF, image.digest, "application/x.test+json")
            await client.list_referrers(REF, image.digest)

    run(main)
    referrers = [r for r in mirror_requests if "/referrers/" in r.url.path]
    assert referrers, [str(r.url) for r in mirror_requests]
    assert all(r.url.params.get("ns") == "reg.test" for r in mirror_requests), [
        str(r.url) for r in mirror_requests]
    assert referrers[0].url.params.get("artifactType") == "application/x.test+json"
