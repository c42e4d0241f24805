"""The registry client's counters: bytes by source, credential lookups and token fetches by
result, and the log events of credential failures (never with the secret)."""

from __future__ import annotations

import logging

import pytest
import trio

from registry import (
    AuthenticationError,
    Credentials,
    CredentialsError,
    RegistryClient,
    RegistryHost,
)
from tests.registry.fake_registry import FAST, FixedHosts, make_client
from tests.registry.test_client_mock import DATA, REF, read, seeded


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


@pytest.mark.parametrize("mirror", [False, True])
def test_blob_bytes_are_counted_by_source_and_on_the_reader(mirror: bool) -> None:
    fake, digest = seeded()
    hosts = {fake.host: [RegistryHost(f"https://{fake.host}/v2", is_mirror=mirror)]}

    async def main() -> tuple[RegistryClient, int]:
        async with make_client(fake, hosts=hosts) as client:
            blob = await client.open_blob(REF, digest)
            assert await blob.read_at(10, 100) == DATA[10:110]
            assert await blob.read_at(0, 5) == DATA[:5]
            return client, blob.bytes_read

    client, on_reader = trio.run(main)
    source, other = ("mirror", "origin") if mirror else ("origin", "mirror")
    assert client.stats.blob_bytes == {source: 105, other: 0} and on_reader == 105
    assert client.stats.blob_reads == {source: 2, other: 0}


def test_credential_lookups_and_token_fetches_are_counted_by_result() -> None:
    fake, digest = seeded(auth="bearer")

    async def main() -> RegistryClient:
        async with make_client(fake, credentials=Credentials("alice", "s3cret")) as client:
            assert await read(client, digest, 0, 10) == DATA[:10]
            return client

    stats = trio.run(main).stats
    assert stats.credential_lookups == {"found": 1, "none": 0, "error": 0}
    assert stats.token_fetches == {"ok": 1, "refused": 0, "error": 0}


def test_a_refused_token_is_counted_and_logged_without_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, digest = seeded(auth="bearer")
    clients: list[RegistryClient] = []

    async def main() -> None:
        async with make_client(fake, credentials=Credentials("alice", "wrong-pw")) as client:
            clients.append(client)
            await read(client, digest, 0, 10)

    caplog.set_level(logging.INFO)
    with pytest.raises(AuthenticationError):
        trio.run(main)
    assert clients[0].stats.token_fetches["refused"] >= 1
    [event, *_] = _events(caplog, "registry_token_refused")
    assert event.host == fake.host and event.with_credentials is True  # type: ignore[attr-defined]
    assert "wrong-pw" not in caplog.text


class _BrokenProvider:
    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        raise CredentialsError("credential helper docker-credential-x exited 1")


def test_a_failed_credential_lookup_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, digest = seeded(auth="bearer")
    clients: list[RegistryClient] = []

    async def main() -> None:
        client = RegistryClient(FixedHosts({fake.host: [RegistryHost(f"https://{fake.host}/v2")]}),
                                _BrokenProvider(), FAST,
                                _transport_factory=make_client(fake)._engine.transport_factory)
        clients.append(client)
        async with client:
            await read(client, digest, 0, 10)

    caplog.set_level(logging.INFO)
    with pytest.raises(CredentialsError):
        trio.run(main)
    assert clients[0].stats.credential_lookups["error"] == 1
    [event] = _events(caplog, "credential_lookup_failed")
    assert event.host == fake.host  # type: ignore[attr-defined]
