"""benchmarks/scale.py, the cheap parts: distinct images, the quantiles, the process readings,
the arguments, the report's ratios and a failed CRI pull."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import oci_image as oci

SCALE_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def _load_scale() -> ModuleType:
    # benchmarks/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("lazysnap_bench_scale", SCALE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


scale = _load_scale()


def test_each_image_keeps_the_root_file_system_and_gets_a_file_of_its_own() -> None:
    base = oci.TarBuilder().dir("etc").file("etc/os-release", b"debian\n").tar()
    first, second = scale._with_own_file(base, 0), scale._with_own_file(base, 1)
    assert first != second
    with tarfile.open(fileobj=io.BytesIO(second)) as tar:
        assert tar.getnames() == ["etc", "etc/os-release", "etc/lazysnap-bench-image"]
        own = tar.extractfile("etc/lazysnap-bench-image")
        assert own is not None and own.read() == b"scale benchmark image 1\n"


def test_quantiles_pick_observed_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert scale._quantile(values, 0.5) in (50.0, 51.0)
    assert scale._quantile(values, 0.99) == 99.0
    assert scale._quantile(values, 1.0) == 100.0
    assert scale._quantile([], 0.5) != scale._quantile([], 0.5)  # NaN when nothing finished


def test_process_readings_of_this_process() -> None:
    sum(i * i for i in range(200_000))  # some CPU time to read back
    assert scale.cpu_seconds(os.getpid()) > 0
    assert scale.peak_rss(os.getpid()) > 1 << 20


def test_report_gives_lazysnap_over_stargz_and_names_failures() -> None:
    lazy = scale.ArmResult("lazysnap", first_output_s=[1.0, 2.0, 3.0], pull_s=[0.5],
                           daemon_cpu_s=4.0, daemon_peak_rss=100_000_000)
    stargz = scale.ArmResult("stargz", first_output_s=[2.0, 4.0, 6.0], pull_s=[0.4],
                             daemon_cpu_s=2.0, daemon_peak_rss=50_000_000,
                             failures=["container 1-0: exit 1: boom"])
    report = scale.render([lazy, stargz], 3, "loopback")
    assert "p50 0.50x" in report and "p99 0.50x" in report
    assert "CPU 2.00x" in report and "peak RSS 2.00x" in report
    assert "stargz failure: container 1-0: exit 1: boom" in report


def test_arms_default_to_the_ctr_pair_and_take_the_cri_arms() -> None:
    _, arms = scale.parse_arguments([])
    assert arms == ["lazysnap", "stargz"]
    args, arms = scale.parse_arguments(["--arms", "cri-lazysnap, cri-stargz", "--images", "3"])
    assert arms == ["cri-lazysnap", "cri-stargz"] and args.images == 3
    assert args.py_spy is None and args.metrics is None and args.lazy_setting == []
    args, _ = scale.parse_arguments(["--lazy-setting", "background_fetch = false"])
    assert args.lazy_setting == ["background_fetch = false"]


@pytest.mark.parametrize("argv", [["--arms", "cri-overlayfs"], ["--arms", ","],
                                  ["--arms", "cri-stargz,cri-stargz"], ["--containers", "0"]])
def test_bad_arguments_end_with_a_message(argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        scale.parse_arguments(argv)
    assert ended.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_report_gives_each_lazysnap_arm_over_its_own_stargz_counterpart() -> None:
    cri_lazy = scale.ArmResult("cri-lazysnap", first_output_s=[3.0, 6.0], pull_s=[1.0, 3.0],
                               daemon_cpu_s=9.0, containerd_cpu_s=5.0,
                               daemon_peak_rss=300_000_000, bytes_down=200_000_000)
    cri_stargz = scale.ArmResult("cri-stargz", first_output_s=[2.0, 4.0], pull_s=[1.0],
                                 daemon_cpu_s=3.0, daemon_peak_rss=400_000_000,
                                 bytes_down=100_000_000)
    plain_lazy = scale.ArmResult("lazysnap", first_output_s=[1.0], pull_s=[0.5])
    report = scale.render([cri_lazy, cri_stargz, plain_lazy], 2, "loopback")
    cri_line = next(line for line in report.splitlines()
                    if line.startswith("CRI lazysnap / stargz-snapshotter:"))
    assert "p50 1.50x" in cri_line and "pull p50 2.00x" in cri_line
    assert "CPU 3.00x" in cri_line and "peak RSS 0.75x" in cri_line
    assert "MB down 2.00x" in cri_line
    # No stargz arm ran beside the ctr arm: no ratio line for it.
    assert not any(line.startswith("lazysnap / ") for line in report.splitlines())
    cri_row = next(line for line in report.splitlines() if line.startswith("cri-lazysnap "))
    assert cri_row.split()[1:3] == ["2", "3.00"]  # finished containers, p50


class _FailingPulls:
    def pull(self, reference: str) -> str:
        raise RuntimeError(f"PullImage {reference}: not found")


def test_a_failed_cri_pull_is_counted_and_starts_no_pod(tmp_path: Path) -> None:
    result = scale.ArmResult("cri-lazysnap")
    scale._start_image_cri(_FailingPulls(), 7, "registry/bench/scale7:latest", 5,
                           tmp_path / "pods", time.monotonic(), result, threading.Lock())
    assert len(result.pull_s) == 1 and result.first_output_s == []
    assert result.failures == ["pull 7: PullImage registry/bench/scale7:latest: not found"]
    assert not (tmp_path / "pods").exists()
