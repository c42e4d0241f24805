"""The system CA bundle is loaded once (ahead of the first request when warmed up) and shared;
hosts with their own TLS settings still get their own context."""

from __future__ import annotations

import trio

from registry._http import Engine
from registry.hosts import RegistryHost
from registry.options import ClientOptions
from tests.integration.fuse_support import trio_test


@trio_test
async def test_warm_up_builds_the_shared_system_context_once() -> None:
    engine = Engine(ClientOptions(), None)
    await engine.warm_up()
    warmed = engine._system_tls
    assert warmed is not None
    await engine.warm_up()
    assert engine._system_tls is warmed
    plain, other = RegistryHost("https://a.test/v2"), RegistryHost("https://b.test/v2")
    assert engine._ssl_context(plain) is warmed and engine._ssl_context(other) is warmed
    insecure = engine._ssl_context(RegistryHost("https://c.test/v2", skip_verify=True))
    assert insecure is not warmed and not insecure.check_hostname
    assert warmed.check_hostname  # the shared one was not touched
    await engine.aclose()


def test_without_warm_up_the_first_request_builds_it() -> None:
    async def main() -> None:
        engine = Engine(ClientOptions(), None)
        context = engine._ssl_context(RegistryHost("https://a.test/v2"))
        assert engine._system_tls is context and context.check_hostname
        await engine.aclose()

    trio.run(main)
