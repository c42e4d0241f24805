"""Shared fixtures. Services are real (docker-registry, containerd, FUSE); each skip says why."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker_registry import RunningRegistry, registry_available, run_registry


def _require(condition: bool, reason: str) -> None:
    if not condition:
        # In CI every service must be present: a skip there would hide a broken install.
        if os.environ.get("CI"):
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    has_fuse = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
    for item in items:
        if "root" in item.keywords and not is_root and not os.environ.get("CI"):
            item.add_marker(pytest.mark.skip(reason="needs root to mount"))
        if "fuse" in item.keywords and not has_fuse and not os.environ.get("CI"):
            item.add_marker(pytest.mark.skip(reason="needs /dev/fuse and fusermount3"))


@pytest.fixture(scope="session")
def docker_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A plain-HTTP docker-registry on 127.0.0.1, shared by the whole session."""
    _require(registry_available(), "Debian's docker-registry is not installed")
    with run_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    """A registry of the test's own, for tests that need an empty or specially set up one."""
    _require(registry_available(), "Debian's docker-registry is not installed")
    with run_registry(tmp_path / "registry") as running:
        yield running
