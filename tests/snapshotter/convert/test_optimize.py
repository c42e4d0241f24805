"""The pure parts of ``lazysnap convert --optimize``: the access log's read order, the runtime
spec, the image's environment, and the checks made before anything is converted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from registry import Platform, parse_reference
from snapshotter.convert.documents import DEFAULT_PATH, ConvertError, image_runtime
from snapshotter.convert.image import ConvertOptions, convert_image
from snapshotter.convert.optimize import OptimizeSpec, read_order, runc_spec
from tests.registry.fake_registry import FakeRegistry, make_client


def test_read_order_is_by_first_read_time_each_path_once() -> None:
    lines = [
        {"layer": "001-b", "path": "etc/hello", "offset": 0, "size": 4096, "seconds": 0.5},
        {"layer": "000-a", "path": "bin/busybox", "offset": 0, "size": 4096, "seconds": 0.1},
        {"layer": "002-c", "path": "etc/hello", "offset": 0, "size": 4096, "seconds": 0.7},
        {"layer": "000-a", "path": "/lib/x.so", "offset": 0, "size": 4096, "seconds": 0.3},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n\n"
    assert read_order(text) == ("bin/busybox", "lib/x.so", "etc/hello")


def test_runc_spec_runs_the_command_in_the_image_environment(tmp_path: Path) -> None:
    spec = runc_spec(tmp_path, ["python3", "-c", "print(1)"], ["PATH=/bin", "A=b"], "/app")
    assert spec["root"] == {"path": str(tmp_path), "readonly": False}
    assert spec["process"]["args"] == ["python3", "-c", "print(1)"]
    assert spec["process"]["env"] == ["PATH=/bin", "A=b"] and spec["process"]["cwd"] == "/app"
    assert {"type": "network"} in spec["linux"]["namespaces"], "no network but loopback"
    assert {m["destination"] for m in spec["mounts"]} >= {"/proc", "/dev", "/sys"}


def test_image_runtime_reads_env_and_working_dir() -> None:
    config = {"config": {"Env": ["PATH=/opt/bin", "LANG=C"], "WorkingDir": "/srv"}}
    assert image_runtime(json.dumps(config).encode()) == (["PATH=/opt/bin", "LANG=C"], "/srv")
    assert image_runtime(b"{}") == ([DEFAULT_PATH], "/")
    relative = {"config": {"Env": ["X=1"], "WorkingDir": "srv"}}
    assert image_runtime(json.dumps(relative).encode()) == ([DEFAULT_PATH, "X=1"], "/")


def test_optimize_with_every_platform_is_refused_before_any_request() -> None:
    fake = FakeRegistry()
    options = ConvertOptions(
        "estargz", Platform("linux", "amd64"), all_platforms=True,
        optimize=OptimizeSpec(("true",)),
    )

    async def main() -> None:
        async with make_client(fake) as client:
            await convert_image(
                client, parse_reference("reg.test/a:1"), parse_reference("reg.test/a:2"), options
            )

    with pytest.raises(ConvertError, match="drop --all-platforms"):
        trio.run(main)
    assert fake.requests == []
