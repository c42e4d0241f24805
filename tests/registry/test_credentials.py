from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import trio

from registry import Credentials, CredentialsError, DockerConfigCredentials
from registry.credentials import docker_config_path


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _lookup(config: Path, host: str) -> Credentials | None:
    return trio.run(DockerConfigCredentials(config).credentials_for, host)


def test_config_path(tmp_path: Path) -> None:
    assert docker_config_path({"DOCKER_CONFIG": "/d"}) == Path("/d/config.json")
    assert docker_config_path({"HOME": "/home/x"}) == Path("/home/x/.docker/config.json")


def test_auths_entries(tmp_path: Path) -> None:
    auth = base64.b64encode(b"bob:pa:ss").decode()
    config = _write(
        tmp_path / "config.json",
        {
            "auths": {
                "r.io": {"auth": auth},
                "https://other.io": {"username": "u", "password": "p"},
                "https://index.docker.io/v1/": {"identitytoken": "refresh"},
                "empty.io": {},
            }
        },
    )
    creds = _lookup(config, "r.io")
    assert creds is not None and (creds.username, creds.password) == ("bob", "pa:ss")
    other = _lookup(config, "other.io")
    assert other is not None and other.password == "p"
    hub = _lookup(config, "registry-1.docker.io")
    assert hub is not None and hub.identity_token == "refresh"
    assert _lookup(config, "empty.io") is None
    assert _lookup(config, "unknown.io") is None
    assert _lookup(tmp_path / "missing.json", "r.io") is None


def test_bad_auth_field(tmp_path: Path) -> None:
    config = _write(tmp_path / "config.json", {"auths": {"r.io": {"auth": "!!!"}}})
    with pytest.raises(CredentialsError, match="base64"):
        _lookup(config, "r.io")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CredentialsError, match="cannot read"):
        _lookup(tmp_path / "bad.json", "r.io")


@pytest.fixture
def helper_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "docker-credential-fake"
    # A credential helper speaking the docker-credential protocol: server URL on stdin.
    script.write_text(
        "#!/bin/sh\n"
        "read server\n"
        'case "$server" in\n'
        '  r.io) echo \'{"ServerURL":"r.io","Username":"helper-user","Secret":"helper-pass"}\' ;;\n'
        '  tok.io) echo \'{"ServerURL":"tok.io","Username":"<token>","Secret":"idt"}\' ;;\n'
        "  broken.io) echo boom >&2; exit 3 ;;\n"
        "  *) echo 'credentials not found in native keychain'; exit 1 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return bindir


def test_cred_helpers(tmp_path: Path, helper_dir: Path) -> None:
    config = _write(
        tmp_path / "config.json",
        {"credHelpers": {"r.io": "fake", "tok.io": "fake", "broken.io": "fake", "none.io": "fake"}},
    )
    creds = _lookup(config, "r.io")
    assert creds is not None and creds.password == "helper-pass"
    tok = _lookup(config, "tok.io")
    assert tok is not None and tok.identity_token == "idt" and not tok.username
    assert _lookup(config, "none.io") is None
    with pytest.raises(CredentialsError, match="exit code 3"):
        _lookup(config, "broken.io")


def test_creds_store_then_auths(tmp_path: Path, helper_dir: Path) -> None:
    config = _write(
        tmp_path / "config.json",
        {"credsStore": "fake", "auths": {"x.io": {"username": "a", "password": "b"}}},
    )
    store, auths = _lookup(config, "r.io"), _lookup(config, "x.io")
    assert store is not None and store.password == "helper-pass"
    assert auths is not None and auths.password == "b"


def test_missing_helper(tmp_path: Path) -> None:
    config = _write(tmp_path / "config.json", {"credHelpers": {"r.io": "does-not-exist-xyz"}})
    with pytest.raises(CredentialsError, match="cannot run"):
        _lookup(config, "r.io")
