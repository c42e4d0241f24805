"""Registry credentials captured from kubelet's ``PullImage`` calls, kept per host and repository
and saved to a root-only file so that a daemon restart does not lose them.

The file lives beside the daemon socket (``/run/lazysnap``, a tmpfs: it survives a restart, not
a reboot) with mode 0600 in a 0700 directory, and is replaced whole by rename on each change.
A corrupted or unreadable file is ignored with a log line; the next pull rebuilds it. Secrets
never reach a log or a message: only hosts and repositories are logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry import CredentialProvider, Credentials, forget_credentials
from snapshotter.daemon.cri_pull_auth import same_host

log = logging.getLogger(__name__)

FILE_VERSION = 1
# A node pulls from a bounded set of repositories; the oldest capture goes first beyond this.
MAX_ENTRIES = 4096
MAX_FILE_BYTES = 16 * 1024 * 1024

Key = tuple[str, str]  # (host, repository)


def _host_key(host: str) -> str:
    lowered = host.strip().lower()
    return "docker.io" if same_host(lowered, "docker.io") else lowered


def _entry(key: Key, credentials: Credentials) -> dict[str, str]:
    return {"host": key[0], "repository": key[1], "username": credentials.username,
            "password": credentials.password, "identity_token": credentials.identity_token}


def _parse(raw: bytes) -> dict[Key, Credentials]:
    data: Any = json.loads(raw)
    if not isinstance(data, Mapping) or data.get("version") != FILE_VERSION:
        raise ValueError("not a version 1 credentials file")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError("no entries list")
    parsed: dict[Key, Credentials] = {}
    for entry in entries[-MAX_ENTRIES:]:
        fields = ("host", "repository", "username", "password", "identity_token")
        if not isinstance(entry, Mapping) or not all(isinstance(entry.get(f), str)
                                                     for f in fields):
            raise ValueError("an entry is not a set of strings")
        parsed[(_host_key(entry["host"]), entry["repository"])] = Credentials(
            username=entry["username"], password=entry["password"],
            identity_token=entry["identity_token"],
        )
    return parsed


class CriCredentials:
    """A CredentialProvider: CRI-captured credentials for the exact repository, then
    ``fallback`` (the docker config)."""

    def __init__(self, path: Path, fallback: CredentialProvider | None) -> None:
        self._path = path
        self._fallback = fallback
        self._lock = threading.Lock()  # captures run on gRPC threads, lookups on the trio thread
        self._stored: dict[Key, Credentials] = {}

    def __repr__(self) -> str:
        with self._lock:
            return f"CriCredentials(path={str(self._path)!r}, entries={sorted(self._stored)})"

    def load(self) -> None:
        """Read the saved captures; a missing file is an empty store, a bad one is ignored."""
        try:
            with self._path.open("rb") as file:
                raw = file.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cri credentials file unreadable; ignored until the next pull rebuilds it",
                        extra={"path": str(self._path), "error": exc.strerror})
            return
        try:
            if len(raw) > MAX_FILE_BYTES:
                raise ValueError("too large")
            stored = _parse(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            # The exception text of a JSON error may quote the file, which holds secrets.
            reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
            log.warning("cri credentials file corrupted; ignored until the next pull rebuilds it",
                        extra={"path": str(self._path), "reason": reason})
            return
        with self._lock:
            self._stored = stored
        log.info("cri credentials loaded",
                 extra={"path": str(self._path), "entries": len(stored)})

    def entries(self) -> list[Key]:
        with self._lock:
            return sorted(self._stored)

    def stored(self, host: str, repository: str) -> Credentials | None:
        """The captured set for ``repository`` on ``host``, if any."""
        with self._lock:
            return self._stored.get((_host_key(host), repository))

    def capture(self, host: str, repository: str, credentials: Credentials) -> None:
        """Keep ``credentials`` for ``repository`` on ``host`` and save the store; raises
        OSError when the file cannot be written (the set is then kept in memory only)."""
        key = (_host_key(host), repository)
        with self._lock:
            if self._stored.get(key) == credentials:
                return
            self._stored.pop(key, None)
            self._stored[key] = credentials  # the newest last: eviction takes the oldest
            while len(self._stored) > MAX_ENTRIES:
                del self._stored[next(iter(self._stored))]
            self._save_locked()
        log.info("cri credentials captured",
                 extra={"host": key[0], "repository": repository,
                        "username": credentials.username})

    def _save_locked(self) -> None:
        document = {"version": FILE_VERSION,
                    "entries": [_entry(k, c) for k, c in self._stored.items()]}
        data = json.dumps(document).encode()
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise

    async def credentials_for(self, host: str, repository: str = "") -> Credentials | None:
        with self._lock:
            found = self._stored.get((_host_key(host), repository)) if repository else None
        if found is not None:
            return found
        return await self._fallback.credentials_for(host, repository) if self._fallback else None

    def forget(self, host: str, repository: str = "") -> None:
        # What was handed to the daemon stays until replaced; the sources behind it may cache.
        forget_credentials(self._fallback, host, repository)
