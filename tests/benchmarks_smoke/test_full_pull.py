"""benchmarks/full_pull.py's scratch directory: marked for the Orlov allocator, trees kept."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

# Loading startup.py first puts benchmarks/ on sys.path, which full_pull.py imports from.
from tests.benchmarks_smoke.test_startup_stargz import startup  # noqa: F401

FULL_PULL_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "full_pull.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lazysnap_bench_full_pull", FULL_PULL_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


full_pull = _load()


def test_the_scratch_directory_is_a_top_directory_for_ext4(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+T", str(probe)], check=False, capture_output=True).returncode:
        pytest.skip("no chattr +T on this file system")
    top = full_pull.scratch_directory(tmp_path)
    assert top.parent == tmp_path
    flags = subprocess.run(["lsattr", "-d", str(top)], check=True, capture_output=True,
                           text=True).stdout.split()[0]
    assert "T" in flags


def test_runs_are_not_deleted_between_rounds() -> None:
    source = FULL_PULL_PATH.read_text()
    # The only deletion is the whole scratch directory's, at the end.
    assert source.count("shutil.rmtree(") == 1
    assert "shutil.rmtree(top, ignore_errors=True)" in source
