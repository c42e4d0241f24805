"""Small helpers shared by the registry integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def write_hosts_toml(hosts_dir: Path, registry: str, text: str) -> Path:
    """``<hosts_dir>/<registry>/hosts.toml`` with ``text``; returns the host's directory."""
    directory = hosts_dir / registry
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return directory


def write_docker_config(directory: Path, doc: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(doc))
    return directory


def lazysnap(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``lazysnap`` CLI of this checkout in a subprocess."""
    environ = dict(os.environ)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environ,
    )


def require(condition: bool, reason: str) -> None:
    """Skip without the tool, except in CI, where a missing tool must fail loudly."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)
