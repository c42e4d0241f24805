"""CRI-captured credentials: per host and repository, saved 0600, reloaded, bad files ignored."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import trio

from registry import Credentials, StaticCredentials
from snapshotter.daemon import cri_credentials
from snapshotter.daemon.cri_credentials import CriCredentials

SECRET = "captured-Pa55"


def _lookup(store: CriCredentials, host: str, repository: str) -> Credentials | None:
    async def lookup() -> Credentials | None:
        return await store.credentials_for(host, repository)

    return trio.run(lookup)


def test_captured_credentials_are_for_their_repository_then_the_fallback(tmp_path: Path) -> None:
    fallback = StaticCredentials({"reg:5000": Credentials("config", "config-pw")})
    store = CriCredentials(tmp_path / "run" / "cri.json", fallback)
    store.capture("REG:5000", "team/app", Credentials("bob", SECRET))
    assert _lookup(store, "reg:5000", "team/app") == Credentials("bob", SECRET)
    assert _lookup(store, "reg:5000", "team/other") == Credentials("config", "config-pw")
    assert _lookup(store, "reg:5000", "") == Credentials("config", "config-pw")


def test_the_file_is_root_only_and_a_new_store_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "cri.json"
    store = CriCredentials(path, None)
    store.capture("index.docker.io", "library/busybox", Credentials("bob", SECRET))
    store.capture("reg:5000", "a", Credentials(identity_token="tok"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["cri.json"]  # no temporary left
    again = CriCredentials(path, None)
    again.load()
    assert again.entries() == [("docker.io", "library/busybox"), ("reg:5000", "a")]
    assert _lookup(again, "registry-1.docker.io", "library/busybox") == Credentials("bob", SECRET)
    assert _lookup(again, "reg:5000", "a") == Credentials(identity_token="tok")
    assert SECRET not in repr(again)


@pytest.mark.parametrize("content", [b"{not json " + SECRET.encode(), b"[]",
                                     b'{"version": 1, "entries": [{"host": 1}]}'])
def test_a_corrupted_file_is_ignored_with_a_log_line_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "cri.json"
    path.write_bytes(content)
    store = CriCredentials(path, None)
    with caplog.at_level(logging.INFO):
        store.load()
    assert store.entries() == []
    assert "cri credentials file corrupted" in caplog.text
    assert SECRET not in caplog.text
    store.capture("reg:5000", "a", Credentials("bob", "new"))
    rebuilt = CriCredentials(path, None)
    rebuilt.load()
    assert rebuilt.entries() == [("reg:5000", "a")]


def test_a_deleted_file_is_an_empty_store(tmp_path: Path) -> None:
    store = CriCredentials(tmp_path / "missing.json", None)
    store.load()
    assert store.entries() == []


def test_the_oldest_capture_goes_first_beyond_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cri_credentials, "MAX_ENTRIES", 2)
    store = CriCredentials(tmp_path / "cri.json", None)
    for name in ("a", "b", "c"):
        store.capture("reg:5000", name, Credentials("u", name))
    assert store.entries() == [("reg:5000", "b"), ("reg:5000", "c")]


def test_captures_are_logged_without_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CriCredentials(tmp_path / "cri.json", None)
    with caplog.at_level(logging.DEBUG):
        store.capture("reg:5000", "a", Credentials("bob", SECRET))
    assert "cri credentials captured" in caplog.text
    assert SECRET not in caplog.text and all(
        SECRET not in str(record.__dict__) for record in caplog.records
    )
