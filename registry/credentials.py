"""Credentials from docker's ``config.json`` and ``docker-credential-<name>`` helpers.

Lookup order for a registry host, as docker does: ``credHelpers[host]``, then ``credsStore``,
then the ``auths`` entry (``auth`` = base64 ``user:password``, or ``username``/``password``,
or ``identitytoken``). ``docker.io`` is stored under ``https://index.docker.io/v1/``.
Secrets are kept out of every repr and message.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio

from registry.errors import CredentialsError

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password, or an identity (refresh) token. Never printed."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    # Seconds the source means them to be used before it is asked again (None: the client's
    # own credentials_ttl). Not part of what they are: two sets compare by their secrets.
    valid_for: float | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        kinds = [
            k
            for k, v in (("password", self.password), ("identity_token", self.identity_token))
            if v
        ]
        return f"Credentials(username={self.username!r}, has={'+'.join(kinds) or 'nothing'})"


class CredentialProvider(Protocol):
    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        """Credentials for a registry host (``host[:port]``) and, when known, the repository
        (``library/busybox``) the request is for; None for anonymous access."""
        ...


@runtime_checkable
class ForgetfulCredentialProvider(CredentialProvider, Protocol):
    """A provider that caches what its sources answered and can be told to ask them again."""

    def forget(self, host: str, repository: str = "") -> None:
        """The registry refused what the last lookup for ``host`` and ``repository`` gave: drop
        any cached answer, so that the next lookup asks the sources themselves again."""
        ...


def forget_credentials(provider: CredentialProvider | None, host: str, repository: str) -> None:
    """Tell ``provider`` to ask its sources again for ``host`` and ``repository``, if it caches."""
    if isinstance(provider, ForgetfulCredentialProvider):
        provider.forget(host, repository)


class StaticCredentials:
    """Fixed credentials per host (tests, and callers that got them elsewhere)."""

    def __init__(self, by_host: Mapping[str, Credentials]) -> None:
        self._by_host = dict(by_host)

    def __repr__(self) -> str:
        return f"StaticCredentials(hosts={sorted(self._by_host)})"

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        return self._by_host.get(host)


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if env is None else env
    directory = environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    return Path(environ.get("HOME") or Path.home()) / ".docker" / "config.json"


def _auth_keys(host: str) -> list[str]:
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return [DOCKER_HUB_AUTH_KEY, "index.docker.io", "docker.io", "registry-1.docker.io"]
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]


def _from_auth_entry(entry: Mapping[str, Any], where: str) -> Credentials | None:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    identity = entry.get("identitytoken") or ""
    encoded = entry.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise CredentialsError(f"{where}: 'auth' is not base64 of user:password") from exc
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"{where}: 'auth' does not decode to user:password")
    if not (password or identity):
        return None
    return Credentials(str(username), str(password), str(identity))


class DockerConfigCredentials:
    """Reads ``$DOCKER_CONFIG/config.json`` (else ``~/.docker/config.json``) on each lookup."""

    def __init__(self, config_path: Path | None = None, *, helper_timeout: float = HELPER_TIMEOUT):
        self.config_path = config_path or docker_config_path()
        self.helper_timeout = helper_timeout

    def __repr__(self) -> str:
        return f"DockerConfigCredentials({str(self.config_path)!r})"

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"cannot read docker config {self.config_path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CredentialsError(f"docker config {self.config_path} is not a JSON object")
        return data

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        # docker's config has credentials per host only: every repository shares them.
        config = await anyio.to_thread.run_sync(self._load)
        keys = _auth_keys(host)
        helpers = config.get("credHelpers") or {}
        for key in (host, *keys):
            if key in helpers:
                return await self._from_helper(str(helpers[key]), keys[0])
        store = config.get("credsStore")
        if store:
            found = await self._from_helper(str(store), keys[0])
            if found is not None:
                return found
        auths = config.get("auths") or {}
        for key in keys:
            entry = auths.get(key)
            if isinstance(entry, dict):
                return _from_auth_entry(entry, f"{self.config_path} auths[{key!r}]")
        return None

    async def _from_helper(self, helper: str, server: str) -> Credentials | None:
        program = f"docker-credential-{helper}"
        try:
            with anyio.fail_after(self.helper_timeout):
                result = await anyio.run_process(
                    [program, "get"], input=server.encode(), check=False
                )
        except TimeoutError as exc:
            raise CredentialsError(f"{program} did not answer in {self.helper_timeout}s") from exc
        except OSError as exc:
            raise CredentialsError(f"cannot run credential helper {program}: {exc}") from exc
        if result.returncode != 0:
            # The helper protocol's "not found" answer means anonymous; anything else is an error.
            message = result.stdout.decode(errors="replace").strip()
            if "credentials not found" in message.lower():
                return None
            raise CredentialsError(f"{program} failed with exit code {result.returncode}")
        try:
            answer = json.loads(result.stdout)
            username, secret = str(answer["Username"]), str(answer["Secret"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CredentialsError(f"{program} answered something that is not its JSON") from exc
        log.debug("credentials source=helper helper=%s server=%s", helper, server)
        if username == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(username, secret)
