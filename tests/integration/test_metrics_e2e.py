"""/metrics and ``lazysnap status --layers`` during a real lazy pull and run: containerd 1.6,
runc, the docker-registry on loopback and the lazysnap daemon, scraped at 10 Hz throughout.

The registry's access log is the reference: what the daemon says it fetched from the registry
must be what the registry says it served, byte for byte.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_lazy_end_to_end import (
    HELLO,
    ConvertedImage,
    _layer_bytes_served,
    _lazysnap,
    _pull,
    _run,
    converted,
    plain_image,
)
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import running_daemon
from tests.support.docker_registry import RunningRegistry
from tests.support.marks import full_stack

pytestmark = full_stack()

__all__ = ["converted", "plain_image"]  # module fixtures this test shares

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# A layer's footer and TOC are read from the blob's tail before it is attached.
TOC_READ_LIMIT = 2 << 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and labels.items() <= dict(sample_labels).items())


class Scraper:
    """Scrapes at 10 Hz on a thread, as a Prometheus with a short interval would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes: list[Samples] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.scrapes.append(_scrape(self.url))
            except BaseException as exc:
                self.errors.append(exc)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def metered_stack(short_tmp: Path) -> Iterator[tuple[str, Path, RunningContainerd]]:
    """lazysnap without background fetch, serving /metrics on a free port; containerd."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    config = short_tmp / "lazysnap.toml"
    config.write_text("[lazy]\nbackground_fetch = false\n")
    address = f"127.0.0.1:{_free_port()}"
    with running_daemon(short_tmp / "d", extra_args=["--config", str(config),
                                                     "--metrics-address", address]) as daemon, \
            run_containerd(short_tmp / "c", daemon.address) as containerd:
        yield f"http://{address}/metrics", daemon.address, containerd


def test_metrics_and_status_follow_a_lazy_pull_and_run(
    metered_stack: tuple[str, Path, RunningContainerd],
    docker_registry: RunningRegistry,
    converted: dict[str, ConvertedImage],
) -> None:
    url, daemon_address, containerd = metered_stack
    image = converted["estargz"]
    digests = [layer["digest"] for layer in image.layers]
    base = digests[0]  # busybox and /etc/hello
    log_start = len(docker_registry.log())
    before = _scrape(url)

    with Scraper(url) as scraper:
        _pull(containerd, image.reference)
        pulled = _scrape(url)
        output = _run(containerd, image.reference, "metered", "/bin/cat", "/etc/hello")
        time.sleep(0.3)  # a few more scrapes after the run
    assert output == HELLO.decode()
    ran = _scrape(url)

    # Every scrape parsed, and no counter ever went down while bytes moved.
    assert scraper.errors == []
    assert len(scraper.scrapes) >= 5, len(scraper.scrapes)
    for earlier, later in zip(scraper.scrapes, [*scraper.scrapes[1:], ran], strict=True):
        for key, value in earlier.items():
            if key[0].endswith(("_total", "_count", "_bucket")) and key in later:
                assert later[key] >= value, key

    # The layers are attached, with their sizes.
    assert _total(pulled, "lazysnap_open_layers") == len(digests)
    for layer in image.layers:
        assert _total(ran, "lazysnap_fs_layer_size_bytes", digest=layer["digest"]) == \
            layer["size"]

    # What the daemon fetched from the registry is what the registry served.
    served, _requests = _layer_bytes_served(docker_registry.log()[log_start:], digests)
    fetched = (_total(ran, "lazysnap_registry_fetched_bytes_total")
               - _total(before, "lazysnap_registry_fetched_bytes_total"))
    assert fetched == served > 0
    assert _total(ran, "lazysnap_registry_fetched_bytes_total", source="mirror") == 0

    # The filesystem's chunk fetches are all of it but the footer and TOC reads, and moved as
    # the container read: the run needed busybox and /etc/hello from the base layer.
    chunks = _total(ran, "lazysnap_fs_bytes_fetched_total")
    assert 0 < chunks <= fetched <= chunks + TOC_READ_LIMIT * len(digests)
    assert _total(ran, "lazysnap_fs_bytes_fetched_total", kind="background") == 0
    assert _total(ran, "lazysnap_fs_bytes_fetched_total", kind="on_demand", layer=base) > \
        _total(pulled, "lazysnap_fs_bytes_fetched_total", kind="on_demand", layer=base)
    assert _total(ran, "lazysnap_fs_bytes_served_total", layer=base) >= len(HELLO)
    assert _total(ran, "lazysnap_fs_operation_count_total", operation_type="read_on_demand",
                  layer=base) > 0
    assert _total(ran, "lazysnap_fs_operation_duration_milliseconds_count",
                  operation_type="mount") == len(digests)
    assert _total(ran, "lazysnap_grpc_request_duration_seconds_count",
                  method="/containerd.services.snapshots.v1.Snapshots/Prepare") >= len(digests)
    assert _total(ran, "lazysnap_verification_failures_total") == 0
    # The image has no startup profile: one lookup per image, answered "there is none".
    assert _total(ran, "lazysnap_image_lookups_total", lookup="startup_profile",
                  result="absent") == 1
    assert _total(ran, "lazysnap_image_lookups_total", lookup="startup_profile",
                  result="failed") == 0
    assert _total(ran, "process_resident_memory_bytes") > 0

    # status --layers says, per layer, what the registry served for it.
    result = _lazysnap("status", "--address", str(daemon_address), "--layers", "--json")
    assert result.returncode == 0, result.stderr
    lazy = json.loads(result.stdout)["lazy"]
    assert lazy["mode"] == "lazy"
    by_digest = {layer["digest"]: layer for layer in lazy["layers"]}
    assert sorted(by_digest) == sorted(digests)
    log = docker_registry.log()[log_start:]
    for digest in digests:
        layer = by_digest[digest]
        assert layer["registry_bytes"] == _layer_bytes_served(log, [digest])[0], digest
        assert layer["fetched_bytes"] == _total(ran, "lazysnap_fs_layer_fetched_size_bytes",
                                                digest=digest)
        assert layer["on_demand_bytes"] + layer["prefetch_bytes"] == layer["fetched_bytes"]
        assert layer["format"] == "estargz" and layer["image"] == image.reference
        assert layer["verification"] == "chunks-only" and layer["last_error"] == ""
    assert by_digest[base]["cached_bytes"] > 0

    plain = _lazysnap("status", "--address", str(daemon_address), "--layers")
    assert plain.returncode == 0, plain.stderr
    assert "mode: lazy" in plain.stdout and "verification=chunks-only" in plain.stdout


def test_the_daemon_refuses_to_start_on_a_metrics_port_in_use(short_tmp: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        address = f"127.0.0.1:{held.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "snapshotter.cli", "serve", "--root", str(short_tmp / "root"),
             "--address", str(short_tmp / "lazysnap.sock"), "--metrics-address", address],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lazysnap: cannot start: metrics address {address} is in use: another process "
        "listens on that port (choose another with metrics.address or --metrics-address)"
    )
    # It stopped before touching FUSE or leaving its socket behind.
    with open("/proc/self/mounts") as mounts:
        assert str(short_tmp) not in mounts.read()
    assert not (short_tmp / "lazysnap.sock").exists()
