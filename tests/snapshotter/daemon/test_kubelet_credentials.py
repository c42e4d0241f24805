"""Credentials from kubelet credential provider plugins: which provider is asked, what is
cached under which key and for how long, the refresh ahead of expiry, ``forget`` after a
refusal, and the lookup going on past a plugin that fails."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from registry import Credentials, StaticCredentials
from snapshotter.daemon.kubelet_credentials import KubeletCredentials, pick_auth
from snapshotter.daemon.kubelet_provider_config import ProviderConfig
from snapshotter.daemon.kubelet_provider_exec import ProviderFailed, ProviderResponse

V1 = "credentialprovider.kubelet.k8s.io/v1"


def _provider(name: str, *patterns: str, default: float = 60.0) -> ProviderConfig:
    return ProviderConfig(name, patterns or ("*.reg.io", "reg.io"), default, V1)


class FakePlugins:
    """Answers per provider name; records each run (provider, image)."""

    def __init__(self) -> None:
        self.answers: dict[str, ProviderResponse | Exception] = {}
        self.runs: list[tuple[str, str]] = []

    async def __call__(self, provider: ProviderConfig, bin_dir: Path, image: str,
                       time_limit: float) -> ProviderResponse:
        self.runs.append((provider.name, image))
        answer = self.answers[provider.name]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _answer(password: str, key_type: str = "Image", duration: float | None = None,
            pattern: str = "reg.io") -> ProviderResponse:
    return ProviderResponse(key_type, duration, {pattern: Credentials("u", password)})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(plugins: FakePlugins, *providers: ProviderConfig, clock: Clock | None = None,
           fallback: StaticCredentials | None = None,
           start_soon: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
           ) -> KubeletCredentials:
    return KubeletCredentials(providers, Path("/bin-dir"), fallback, start_soon=start_soon,
                              clock=clock or Clock(), run=plugins)


def _lookup(store: KubeletCredentials, host: str = "reg.io", repository: str = "team/app"
            ) -> Credentials | None:
    async def main() -> Credentials | None:
        return await store.credentials_for(host, repository)

    return trio.run(main)


def _password(found: Credentials | None) -> str | None:
    return None if found is None else found.password


@pytest.mark.parametrize(
    ("key_type", "other_repository_runs_again"),
    [("Image", True), ("Registry", False), ("Global", False)],
)
def test_answers_are_cached_under_their_key_type(
    key_type: str, other_repository_runs_again: bool
) -> None:
    plugins = FakePlugins()
    plugins.answers["p"] = _answer("pw", key_type, pattern="reg.io")
    store = _store(plugins, _provider("p"))
    assert _password(_lookup(store)) == "pw"
    assert _password(_lookup(store)) == "pw"
    assert plugins.runs == [("p", "reg.io/team/app")]
    _lookup(store, repository="team/other")
    assert (len(plugins.runs) == 2) == other_repository_runs_again


def test_global_answers_serve_other_registries_the_provider_matches() -> None:
    plugins = FakePlugins()
    plugins.answers["p"] = ProviderResponse("Global", None, {"*.reg.io": Credentials("u", "g")})
    store = _store(plugins, _provider("p"))
    assert _password(_lookup(store, "a.reg.io")) == "g"
    assert _password(_lookup(store, "b.reg.io")) == "g"
    assert len(plugins.runs) == 1


def test_durations_from_the_answer_else_the_default_and_zero_is_not_cached() -> None:
    plugins, clock = FakePlugins(), Clock()
    store = _store(plugins, _provider("p", default=100), clock=clock)
    plugins.answers["p"] = _answer("a")  # no duration: the provider's default, 100 s
    _lookup(store)
    clock.now += 99
    _lookup(store)
    assert len(plugins.runs) == 1
    clock.now += 2
    plugins.answers["p"] = _answer("b", duration=10)
    assert _password(_lookup(store)) == "b"
    clock.now += 11
    plugins.answers["p"] = _answer("c", duration=0)
    assert _password(_lookup(store)) == "c"
    assert _password(_lookup(store)) == "c"
    assert len(plugins.runs) == 4  # 0 s: asked every time, as kubelet does


def test_a_default_of_zero_is_not_cached() -> None:
    plugins = FakePlugins()
    plugins.answers["p"] = _answer("a")
    store = _store(plugins, _provider("p", default=0))
    _lookup(store)
    _lookup(store)
    assert len(plugins.runs) == 2


def test_refresh_runs_in_the_background_ahead_of_expiry() -> None:
    plugins, clock = FakePlugins(), Clock()
    started: list[Callable[[], Awaitable[None]]] = []
    store = _store(plugins, _provider("p"), clock=clock, start_soon=started.append)
    plugins.answers["p"] = _answer("old", duration=100)
    _lookup(store)
    clock.now += 70  # 30 % of its life left: not due
    _lookup(store)
    assert started == []
    clock.now += 15  # 15 % left: refreshed in the background, the old answer served meanwhile
    plugins.answers["p"] = _answer("new", duration=100)
    assert _password(_lookup(store)) == "old"
    assert _password(_lookup(store)) == "old" and len(started) == 1  # one refresh at a time
    trio.run(started[0])
    assert _password(_lookup(store)) == "new"
    clock.now += 90  # past the old answer's expiry, within the new one's life
    assert _password(_lookup(store)) == "new"
    assert len(plugins.runs) == 2


def test_forget_runs_the_plugin_again() -> None:
    plugins = FakePlugins()
    plugins.answers["p"] = _answer("old", "Registry")
    store = _store(plugins, _provider("p"))
    _lookup(store)
    plugins.answers["p"] = _answer("rotated", "Registry")
    assert _password(_lookup(store)) == "old"
    store.forget("reg.io", "team/app")
    assert _password(_lookup(store)) == "rotated"


def test_matching_providers_in_order_then_the_fallback(caplog: pytest.LogCaptureFixture) -> None:
    plugins = FakePlugins()
    plugins.answers["broken"] = ProviderFailed("it answered something that is not JSON")
    plugins.answers["elsewhere"] = _answer("wrong")
    plugins.answers["empty"] = ProviderResponse("Image", None, {"other.io": Credentials("u", "x")})
    plugins.answers["good"] = _answer("right")
    fallback = StaticCredentials({"reg.io": Credentials("u", "docker"), "b.io": Credentials(
        "u", "fallback")})
    store = _store(plugins, _provider("broken"), _provider("elsewhere", "other.io"),
                   _provider("empty"), _provider("good"), fallback=fallback)
    with caplog.at_level(logging.WARNING):
        assert _password(_lookup(store)) == "right"
    assert [name for name, _ in plugins.runs] == ["broken", "empty", "good"]
    assert "credential provider gave no credentials" in caplog.text
    assert _password(_lookup(store, "b.io")) == "fallback"


def test_an_unexpected_plugin_error_is_logged_and_the_lookup_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugins = FakePlugins()
    plugins.answers["p"] = RuntimeError("boom")
    store = _store(plugins, _provider("p"),
                   fallback=StaticCredentials({"reg.io": Credentials("u", "docker")}))
    assert _password(_lookup(store)) == "docker"
    assert "failed unexpectedly" in caplog.text


def test_concurrent_lookups_run_the_plugin_once() -> None:
    plugins = FakePlugins()
    plugins.answers["p"] = _answer("pw")
    store = _store(plugins, _provider("p"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(store.credentials_for, "reg.io", "team/app")

    trio.run(main)
    assert len(plugins.runs) == 1


def test_pick_auth_takes_the_most_specific_matching_key() -> None:
    auth = {"reg.io": Credentials("u", "host"), "reg.io/team": Credentials("u", "team"),
            "*.io": Credentials("u", "glob")}
    assert _password(pick_auth(auth, "reg.io/team/app")) == "team"
    assert _password(pick_auth(auth, "reg.io/other/app")) == "host"
    assert pick_auth(auth, "reg.io:5000/team/app") is None


def test_the_registry_client_is_told_to_ask_again_when_a_refresh_is_due() -> None:
    plugins, clock = FakePlugins(), Clock()
    store = _store(plugins, _provider("p", default=0), clock=clock, start_soon=lambda _t: None)
    plugins.answers["p"] = _answer("pw", duration=100)
    found = _lookup(store)
    assert found is not None and found.valid_for == pytest.approx(80)  # the refresh point
    clock.now += 90
    found = _lookup(store)
    assert found is not None and found.valid_for == pytest.approx(10)  # then its expiry
    plugins.answers["p"] = _answer("pw", duration=0)
    store.forget("reg.io", "team/app")
    found = _lookup(store)
    assert found is not None and found.valid_for is None  # not cached: the client's default


def test_docker_hubs_api_host_is_asked_about_as_docker_io() -> None:
    plugins = FakePlugins()
    plugins.answers["hub"] = _answer("pw", pattern="docker.io")
    store = _store(plugins, _provider("hub", "docker.io"))
    assert _password(_lookup(store, "registry-1.docker.io", "library/busybox")) == "pw"
    assert plugins.runs == [("hub", "docker.io/library/busybox")]
