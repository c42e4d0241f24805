"""Start Debian's ``docker-registry`` (distribution 2.8) on loopback for a test.

The registry keeps its storage in a temporary directory and is always stopped by the context
manager. Extra configuration (TLS, htpasswd, token auth) is merged into the YAML config.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

REGISTRY_BINARY = "docker-registry"


@dataclass
class RunningRegistry:
    host: str  # "127.0.0.1:PORT", what goes into image references
    url: str  # "http://127.0.0.1:PORT" (or https)
    root: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    ipv6_host: str | None = None  # "[::1]:PORT" when it also listens on IPv6

    @property
    def ipv6_url(self) -> str:
        assert self.ipv6_host is not None, "started without ipv6=True"
        return f"{self.url.split('://')[0]}://{self.ipv6_host}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def registry_available() -> bool:
    return shutil.which(REGISTRY_BINARY) is not None


def _config(root: Path, addr: str, extra: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
        },
        "http": {"addr": addr, "secret": "lazysnap-test-secret"},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


@contextlib.contextmanager
def run_registry(
    workdir: Path, *, extra_config: dict[str, Any] | None = None, scheme: str = "http",
    timeout: float = 20.0, ipv6: bool = False, port: int | None = None,
) -> Iterator[RunningRegistry]:
    """``ipv6``: listen on both loopbacks, 127.0.0.1 and [::1], on one port. ``port``: the one
    of an earlier registry of the same ``workdir``, to restart it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or (free_port("::") if ipv6 else free_port())
    addr = f"127.0.0.1:{port}"
    listen = f"[::]:{port}" if ipv6 else addr
    config_path = workdir / "config.yml"
    # YAML is a superset of JSON, so the config needs no YAML library.
    config_path.write_text(json.dumps(_config(workdir, listen, extra_config or {})))
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
    running = RunningRegistry(
        addr, f"{scheme}://{addr}", workdir, log_path, process,
        ipv6_host=f"[::1]:{port}" if ipv6 else None,
    )
    try:
        _wait_ready(running, timeout)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(running: RunningRegistry, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise RuntimeError(f"docker-registry exited early:\n{running.log()}")
        try:
            # Any HTTP answer (200, or 401 with auth configured) means it is serving.
            urllib.request.urlopen(f"http://{running.host}/v2/", timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"docker-registry not ready in {timeout}s:\n{running.log()}")
