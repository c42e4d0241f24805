"""Auth against the real docker-registry: htpasswd Basic, and token auth with a test token server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from registry import (
    AuthenticationError,
    Credentials,
    DockerConfigCredentials,
    HostsConfig,
    RegistryClient,
    RegistryError,
    StaticCredentials,
    parse_reference,
)
from tests.integration.registry_support.helpers import lazysnap, require, run, write_docker_config
from tests.integration.registry_support.htpasswd import write_htpasswd
from tests.integration.registry_support.images import LayerSpec, push_image, random_blob
from tests.integration.registry_support.tls import openssl_available
from tests.integration.registry_support.token_server import TokenServer, run_token_server
from tests.support.docker_registry import RunningRegistry, registry_available, run_registry

pytestmark = pytest.mark.registry

USER, PASSWORD = "alice", "correct horse"


def _auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    require(registry_available(), "Debian's docker-registry is not installed")
    workdir = tmp_path_factory.mktemp("basic-registry")
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    auth = {"htpasswd": {"realm": "lazysnap-test", "path": str(htpasswd)}}
    with run_registry(workdir, extra_config={"auth": auth}) as running:
        yield running


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningRegistry, TokenServer]]:
    require(
        registry_available() and openssl_available(),
        "needs Debian's docker-registry and the openssl CLI",
    )
    workdir = tmp_path_factory.mktemp("token-registry")
    with (
        run_token_server(
            workdir / "token", users={USER: PASSWORD}, refresh_tokens={"refresh-abc": USER}
        ) as tokens,
        run_registry(workdir, extra_config={"auth": tokens.registry_auth_config()}) as reg,
    ):
        yield reg, tokens


def test_htpasswd_basic_auth_from_docker_config(
    basic_registry: RunningRegistry, tmp_path: Path
) -> None:
    config_dir = write_docker_config(
        tmp_path / "docker", {"auths": {basic_registry.host: _auth_entry(USER, PASSWORD)}}
    )
    name = f"{basic_registry.host}/basic/app:v1"
    layer = random_blob(300_000, seed=21)

    async def main() -> None:
        credentials = DockerConfigCredentials(config_dir / "config.json")
        async with RegistryClient(HostsConfig(tmp_path), credentials) as client:
            pushed = await push_image(client, name, [LayerSpec(layer)])
            image = await client.resolve_image(parse_reference(name))
            assert image.digest == pushed.manifest_digest
            blob = await client.open_blob(parse_reference(name), image.manifest.layers[0].digest)
            assert await blob.read_at(10, 70_000) == layer[10:70_010]

    run(main)
    ok = lazysnap(
        "inspect", name, "--hosts-dir", str(tmp_path), env={"DOCKER_CONFIG": str(config_dir)}
    )
    assert ok.returncode == 0, ok.stderr
    anonymous = lazysnap(
        "inspect",
        name,
        "--hosts-dir",
        str(tmp_path),
        env={"DOCKER_CONFIG": str(tmp_path / "empty")},
    )
    assert anonymous.returncode == 1 and "AuthenticationError" in anonymous.stderr


def test_htpasswd_wrong_password(basic_registry: RunningRegistry, tmp_path: Path) -> None:
    async def main() -> None:
        creds = StaticCredentials({basic_registry.host: Credentials(USER, "wrong-secret")})
        async with RegistryClient(HostsConfig(tmp_path), creds) as client:
            await client.resolve(parse_reference(f"{basic_registry.host}/basic/app:v1"))

    with pytest.raises(AuthenticationError) as info:
        run(main)
    assert "wrong-secret" not in str(info.value)


def test_token_auth_full_dance(
    token_registry: tuple[RunningRegistry, TokenServer], tmp_path: Path
) -> None:
    registry, tokens = token_registry
    name = f"{registry.host}/token/app:v1"
    layer = random_blob(400_000, seed=31)
    creds = StaticCredentials({registry.host: Credentials(USER, PASSWORD)})

    async def main() -> None:
        async with RegistryClient(HostsConfig(tmp_path), creds) as client:
            pushed = await push_image(client, name, [LayerSpec(layer)])
        # Anonymous pull is allowed by the token server: a token without credentials.
        async with RegistryClient(HostsConfig(tmp_path)) as anonymous:
            image = await anonymous.resolve_image(parse_reference(name))
            assert image.digest == pushed.manifest_digest
            blob = await anonymous.open_blob(parse_reference(name), image.manifest.layers[0].digest)
            for offset in (0, 1000, 399_000):
                assert await blob.read_at(offset, 1000) == layer[offset : offset + 1000]
            # Anonymous push is not granted: the registry keeps answering 401.
            with pytest.raises(RegistryError):
                await anonymous.push_blob(parse_reference(name), b"not allowed")

    run(main)
    users = {r["user"] for r in tokens.requests}
    assert users == {USER, None}
    pushes = [r for r in tokens.requests if any("push" in s for s in r["scopes"])]
    assert pushes and all(r["service"] == "lazysnap-test-registry" for r in pushes)
    inspect = lazysnap("inspect", name, "--json", "--hosts-dir", str(tmp_path))
    assert inspect.returncode == 0, inspect.stderr


def test_token_auth_bad_credentials_and_refresh_token(
    token_registry: tuple[RunningRegistry, TokenServer], tmp_path: Path
) -> None:
    registry, _tokens = token_registry
    name = f"{registry.host}/token/refresh:v1"

    async def main() -> None:
        wrong = StaticCredentials({registry.host: Credentials(USER, "nope-pw")})
        async with RegistryClient(HostsConfig(tmp_path), wrong) as client:
            with pytest.raises(AuthenticationError, match="refused the configured credentials"):
                await client.resolve(parse_reference(name))
        # docker config.json with an identity token: the OAuth2 refresh-token grant.
        config_dir = write_docker_config(
            tmp_path / "docker", {"auths": {registry.host: {"identitytoken": "refresh-abc"}}}
        )
        refresh = DockerConfigCredentials(config_dir / "config.json")
        async with RegistryClient(HostsConfig(tmp_path), refresh) as client:
            pushed = await push_image(client, name, [LayerSpec(b"refresh layer")])
            assert (await client.resolve(parse_reference(name))).digest == pushed.manifest_digest

    run(main)


def test_expired_token_is_refreshed(tmp_path: Path) -> None:
    require(
        registry_available() and openssl_available(),
        "needs Debian's docker-registry and the openssl CLI",
    )
    with (
        run_token_server(tmp_path / "token", users={USER: PASSWORD}, lifetime=2) as tokens,
        run_registry(
            tmp_path / "reg", extra_config={"auth": tokens.registry_auth_config()}
        ) as registry,
    ):
        name = f"{registry.host}/expiry/app:v1"
        layer = random_blob(10_000, seed=41)

        async def main() -> None:
            creds = StaticCredentials({registry.host: Credentials(USER, PASSWORD)})
            async with RegistryClient(HostsConfig(tmp_path), creds) as client:
                pushed = await push_image(client, name, [LayerSpec(layer)])
                blob = await client.open_blob(parse_reference(name), pushed.layers[0][0].digest)
                assert await blob.read_at(0, 100) == layer[:100]
                before = len(tokens.requests)
                await trio.sleep(1.2)  # past the client's refresh point (half the 2 s lifetime)
                assert await blob.read_at(100, 100) == layer[100:200]
                assert len(tokens.requests) == before + 1

        run(main)
