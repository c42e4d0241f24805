"""benchmarks/startup.py's stargz arm, the cheap parts: it pulls the estargz arm's very image, its
stargz-snapshotter config parses as TOML with the mirror where the daemon reads it, and
containerd gets it as a second proxy plugin without changing the default config."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from tests.support.containerd import config_toml

STARTUP_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "startup.py"


def _load_startup() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("lazysnap_bench_startup", STARTUP_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


startup = _load_startup()


def test_stargz_arm_pulls_the_estargz_image() -> None:
    assert "stargz" in startup.ARMS
    assert "stargz" not in startup.DEFAULT_ARMS  # it needs a Go build the first time
    assert startup.TAGS["stargz"] == startup.TAGS["estargz"]


def test_stargz_config_is_toml_with_a_plain_http_mirror() -> None:
    config = tomllib.loads(startup.stargz_config("127.0.0.1:41234"))
    mirrors = config["resolver"]["host"]["127.0.0.1:41234"]["mirrors"]
    assert mirrors == [{"host": "127.0.0.1:41234", "insecure": True}]
    # Only the resolver: every fs option stays at stargz-snapshotter's default.
    assert set(config) == {"resolver"}


def test_containerd_config_registers_extra_proxy_plugins(tmp_path: Path) -> None:
    plain = config_toml(tmp_path, tmp_path / "d.sock")
    assert config_toml(tmp_path, tmp_path / "d.sock", extra_proxy_plugins={}) == plain
    with_stargz = tomllib.loads(
        config_toml(tmp_path, tmp_path / "d.sock", extra_proxy_plugins={"stargz": tmp_path / "s"})
    )
    assert with_stargz["proxy_plugins"] == {
        "lazysnap": {"type": "snapshot", "address": str(tmp_path / "d.sock")},
        "stargz": {"type": "snapshot", "address": str(tmp_path / "s")},
    }
    assert tomllib.loads(plain)["proxy_plugins"].keys() == {"lazysnap"}
