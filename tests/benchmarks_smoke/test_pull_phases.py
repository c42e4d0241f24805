"""benchmarks/pull_phases.py, the cheap parts: the stargz setting it changes, the two log
formats of its timeline and the report's ratios."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    sys.path.insert(0, str(BENCH))  # it imports its neighbours as startup.py and scale.py do
    spec = importlib.util.spec_from_file_location(f"lazysnap_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


phases = _load("pull_phases")
startup = _load("startup")


def test_the_stargz_setting_goes_before_the_resolver_tables() -> None:
    config = tomllib.loads(startup.stargz_config("127.0.0.1:5000", "no_background_fetch = true\n"))
    assert config["no_background_fetch"] is True
    assert config["resolver"]["host"]["127.0.0.1:5000"]["mirrors"][0]["insecure"] is True


def test_cli_text_and_daemon_json_lines_land_on_one_timeline() -> None:
    origin = datetime(2026, 12, 3, 22, 0, 0).timestamp()  # local time, as the CLI logs it
    cli = phases._text_events(
        "2026-12-03 22:00:00,250 INFO snapshotter.commands.pull resolved by the daemon x\n"
        "a line that is not a log line\n", origin, "cli")
    assert cli == [(0.25, "cli pull: resolved by the daemon x")]
    utc = datetime.fromtimestamp(origin, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")  # the daemon's
    daemon = phases._json_events(
        f'{{"time": "{utc}.125Z", "logger": "snapshotter.remote.toc_ahead", "msg": "read"}}\n'
        "not json\n", origin, "daemon")
    assert daemon == [(0.125, "daemon toc_ahead: read")]


def test_the_report_gives_each_arms_median_over_stargzs() -> None:
    arms = [phases.Arm("stargz", None), phases.Arm("lazysnap", None)]  # type: ignore[arg-type]
    arms[0].seconds, arms[1].seconds = [0.2, 0.4, 0.3], [0.9, 0.6, 0.7]
    report = phases.render(arms)
    assert "0.300" in report and "0.700" in report and "2.33x" in report
