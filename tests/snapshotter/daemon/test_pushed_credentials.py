"""Credentials handed to the daemon: looked up first, expire, never printed."""

from __future__ import annotations

import trio

from registry import Credentials, StaticCredentials
from snapshotter.daemon.pushed_credentials import (
    DEFAULT_TTL_SECONDS,
    HOST_WIDE,
    MAX_TTL_SECONDS,
    PushedCredentials,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lookup(provider: PushedCredentials, host: str, repository: str = "") -> Credentials | None:
    async def lookup() -> Credentials | None:
        return await provider.credentials_for(host, repository)

    return trio.run(lookup)


def test_pushed_credentials_win_then_expire_to_the_fallback() -> None:
    clock = Clock()
    fallback = StaticCredentials({"reg:5000": Credentials("from-config", "config-pw")})
    provider = PushedCredentials(fallback, clock=clock)
    assert _lookup(provider, "reg:5000") == Credentials("from-config", "config-pw")
    assert provider.set("reg:5000", HOST_WIDE, Credentials("pushed", "pushed-pw"), 60) == 60
    assert _lookup(provider, "REG:5000") == Credentials("pushed", "pushed-pw")
    clock.now += 61
    assert _lookup(provider, "reg:5000") == Credentials("from-config", "config-pw")
    assert provider.entries() == []


def test_ttl_defaults_and_is_capped() -> None:
    provider = PushedCredentials(None)
    assert provider.set("a", HOST_WIDE, Credentials("u", "p"), 0) == DEFAULT_TTL_SECONDS
    assert provider.set("b", HOST_WIDE, Credentials("u", "p"), 10 * MAX_TTL_SECONDS) == MAX_TTL_SECONDS


def test_docker_hub_aliases_share_credentials() -> None:
    provider = PushedCredentials(None)
    provider.set("docker.io", "library/busybox", Credentials("u", "p"), 60)
    assert _lookup(provider, "registry-1.docker.io", "library/busybox") == Credentials("u", "p")
    assert _lookup(provider, "other.example") is None


def test_repr_names_hosts_but_never_secrets() -> None:
    provider = PushedCredentials(None)
    provider.set("reg:5000", "team/app", Credentials("user", "hunter2-secret"), 60)
    assert "hunter2" not in repr(provider) and "reg:5000" in repr(provider)


def test_two_repositories_of_one_host_keep_their_own_credentials() -> None:
    """Issue 15 item 7: a later client's set for its repository does not become the one
    another repository of the same host uses."""
    fallback = StaticCredentials({"reg:5000": Credentials("from-config", "config-pw")})
    provider = PushedCredentials(fallback)
    provider.set("reg:5000", "team/a", Credentials("alice", "a-pw"), 60)
    provider.set("reg:5000", "team/b", Credentials("bob", "b-pw"), 60)
    assert _lookup(provider, "reg:5000", "team/a") == Credentials("alice", "a-pw")
    assert _lookup(provider, "reg:5000", "team/b") == Credentials("bob", "b-pw")
    # A repository nobody pushed credentials for gets the docker config, not a neighbour's.
    assert _lookup(provider, "reg:5000", "team/c") == Credentials("from-config", "config-pw")
    assert provider.entries() == [("reg:5000", "team/a"), ("reg:5000", "team/b")]


def test_a_host_wide_set_serves_repositories_without_their_own() -> None:
    provider = PushedCredentials(None)
    provider.set("reg:5000", HOST_WIDE, Credentials("ops", "host-pw"), 60)
    provider.set("reg:5000", "team/a", Credentials("alice", "a-pw"), 60)
    assert _lookup(provider, "reg:5000", "team/a") == Credentials("alice", "a-pw")
    assert _lookup(provider, "reg:5000", "team/z") == Credentials("ops", "host-pw")
    assert _lookup(provider, "reg:5000") == Credentials("ops", "host-pw")
