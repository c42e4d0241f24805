"""The daemon's metrics: the collector's families and labels, the endpoint, its configuration."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fusefs import FsSnapshot, LayerMeters, LayerSnapshot
from fusefs.cache import CacheUsage
from fusefs.stats import BACKGROUND, ON_DEMAND
from registry import RegistryStats
from snapshotter.daemon.config import ConfigError, load_config, parse_config, with_overrides
from snapshotter.daemon.grpc_metrics import GrpcStats, MetricsInterceptor
from snapshotter.daemon.metrics import DaemonCollector, DaemonSnapshot
from snapshotter.daemon.metrics_server import MetricsServerError, start_metrics_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _meters(served: int, on_demand: int, background: int = 0) -> LayerMeters:
    meters = LayerMeters()
    meters.served(served, 0.0002)
    meters.fetched_bytes[ON_DEMAND] = on_demand
    meters.fetched_bytes[BACKGROUND] = background
    meters.fetches[ON_DEMAND] = 1
    return meters


def _snapshot(*layers: LayerSnapshot, retired: LayerMeters | None = None) -> DaemonSnapshot:
    registry = RegistryStats()
    registry.blob_read(False, 700)
    registry.blob_read(True, 300)
    registry.credential_lookups["none"] = 2
    fs = FsSnapshot(
        layers=list(layers), retired=retired or LayerMeters(), takeovers=1,
        lost_requests_answered=3,
        cache=CacheUsage(bytes=10, chunks=1, capacity_bytes=100, hits=4, misses=5, stores=1,
                         evictions=2, verify_failures=1, evicted_bytes=20),
    )
    return DaemonSnapshot("9.9", lazy=True, fs=fs, registry=registry,
                          fallbacks={"not_lazy_format": 2, "registry_error": 0},
                          image_lookups={("startup_profile", "found"): 5,
                                         ("soci_index", "failed"): 1})


def _scrape(snapshot: DaemonSnapshot | None, *, per_layer: bool) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(lambda: snapshot, per_layer=per_layer))
    return _parse(generate_latest(registry).decode())


def _parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_per_layer_series_are_labelled_by_digest_and_one_blob_attached_twice_is_summed() -> None:
    samples = _scrape(_snapshot(
        LayerSnapshot("r1", A, 1000, 200, _meters(50, 400)),
        LayerSnapshot("r2", A, 1000, 200, _meters(30, 100)),
        LayerSnapshot("r3", B, 5000, 0, _meters(7, 0, background=900)),
    ), per_layer=True)
    assert samples[("lazysnap_fs_bytes_served_total", (("layer", A),))] == 80
    assert samples[("lazysnap_fs_bytes_served_total", (("layer", B),))] == 7
    assert samples[("lazysnap_fs_bytes_fetched_total", (("kind", "on_demand"), ("layer", A)))] \
        == 500
    assert samples[("lazysnap_fs_bytes_fetched_total", (("kind", "background"), ("layer", B)))] \
        == 900
    assert samples[("lazysnap_fs_layer_size_bytes", (("digest", A),))] == 1000
    assert samples[("lazysnap_fs_layer_fetched_size_bytes", (("digest", B),))] == 900
    assert samples[("lazysnap_fs_layer_prefetch_size_bytes", (("digest", A),))] == 200
    assert samples[("lazysnap_fs_operation_count_total",
                    (("layer", A), ("operation_type", "read_on_demand")))] == 2
    assert samples[("lazysnap_fs_operation_duration_microseconds_count",
                    (("layer", A), ("operation_type", "read_on_demand")))] == 2
    assert samples[("lazysnap_fs_operation_duration_microseconds_bucket",
                    (("layer", A), ("le", "500.0"), ("operation_type", "read_on_demand")))] == 2
    assert samples[("lazysnap_open_layers", ())] == 3


def test_without_per_layer_labels_totals_include_detached_layers() -> None:
    retired = _meters(1000, 4000)
    retired.chunk_verify_failures = 1
    live = _meters(50, 400)
    live.chunk_verify_failures = 2
    samples = _scrape(_snapshot(LayerSnapshot("r1", A, 1000, 200, live), retired=retired),
                      per_layer=False)
    assert samples[("lazysnap_fs_bytes_served_total", ())] == 1050
    assert samples[("lazysnap_fs_bytes_fetched_total", (("kind", "on_demand"),))] == 4400
    assert not any(dict(labels).keys() & {"layer", "digest"} for _, labels in samples)
    assert samples[("lazysnap_verification_failures_total", (("kind", "chunk"),))] == 3
    assert samples[("lazysnap_verification_failures_total", (("kind", "cache"),))] == 1


def test_daemon_wide_families() -> None:
    samples = _scrape(_snapshot(), per_layer=True)
    assert samples[("lazysnap_registry_fetched_bytes_total", (("source", "origin"),))] == 700
    assert samples[("lazysnap_registry_fetched_bytes_total", (("source", "mirror"),))] == 300
    assert samples[("lazysnap_credential_lookups_total", (("result", "none"),))] == 2
    assert samples[("lazysnap_remote_fallback_total", (("reason", "not_lazy_format"),))] == 2
    assert samples[("lazysnap_fuse_takeovers_total", ())] == 1
    assert samples[("lazysnap_fuse_lost_requests_answered_total", ())] == 3
    assert samples[("lazysnap_cache_hits_total", ())] == 4
    assert samples[("lazysnap_cache_evicted_bytes_total", ())] == 20
    assert samples[("lazysnap_daemon_info", (("lazy", "true"), ("version", "9.9")))] == 1
    assert samples[("lazysnap_image_lookups_total",
                    (("lookup", "startup_profile"), ("result", "found")))] == 5
    assert samples[("lazysnap_image_lookups_total",
                    (("lookup", "soci_index"), ("result", "failed")))] == 1


def test_a_stopping_daemon_renders_nothing() -> None:
    assert _scrape(None, per_layer=True) == {}


# -- the endpoint --------------------------------------------------------------------------


def _registry(snapshot: DaemonSnapshot) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(lambda: snapshot, per_layer=True))
    return registry


def test_serves_metrics_over_tcp_and_refuses_a_port_in_use() -> None:
    server = start_metrics_server(f"127.0.0.1:{_free_port()}", _registry(_snapshot()))
    try:
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as answer:
            samples = _parse(answer.read().decode())
        assert samples[("lazysnap_cache_hits_total", ())] == 4
        with pytest.raises(MetricsServerError, match="is in use"):
            start_metrics_server(server.address, _registry(_snapshot()))
    finally:
        server.close()


def test_serves_metrics_on_a_unix_socket_and_replaces_only_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX)
    path.parent.mkdir()
    stale.bind(str(path))  # bound, never listening: what a killed daemon leaves
    stale.close()
    server = start_metrics_server(f"unix:{path}", _registry(_snapshot()))
    try:
        assert _parse(_get_unix(path))[("lazysnap_fuse_takeovers_total", ())] == 1
        with pytest.raises(MetricsServerError, match="is in use"):
            start_metrics_server(f"unix:{path}", _registry(_snapshot()))
    finally:
        server.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(MetricsServerError, match="not a socket"):
        start_metrics_server(f"unix:{path}", _registry(_snapshot()))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get_unix(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


# -- configuration -------------------------------------------------------------------------


def test_metrics_are_off_by_default_and_set_by_file_or_flag(tmp_path: Path) -> None:
    assert parse_config({}).metrics.address is None
    path = tmp_path / "config.toml"
    path.write_text('[metrics]\naddress = "127.0.0.1:9464"\n')
    assert load_config(path).metrics.address == "127.0.0.1:9464"
    config = parse_config({"metrics": {"address": "unix:/run/m.sock", "per_layer": False}})
    assert config.metrics.address == "unix:/run/m.sock" and config.metrics.per_layer is False
    assert with_overrides(config, metrics_address="[::1]:9464").metrics.address == "[::1]:9464"


@pytest.mark.parametrize("address", ["9464", "localhost", "host:0", "host:70000", ":9464",
                                     "unix:relative.sock", "unix:"])
def test_bad_metrics_addresses_are_configuration_errors(address: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.address"):
        parse_config({"metrics": {"address": address}})
    with pytest.raises(ConfigError, match="--metrics-address"):
        with_overrides(parse_config({}), metrics_address=address)


def test_unknown_metrics_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        parse_config({"metrics": {"port": 1}})


# -- gRPC durations ------------------------------------------------------------------------


def _unary(behavior: Callable[[bytes, grpc.ServicerContext], bytes]) -> Any:
    return grpc.unary_unary_rpc_method_handler(behavior)


@pytest.fixture
def grpc_server() -> Iterator[tuple[GrpcStats, grpc.Channel]]:
    stats = GrpcStats()

    def ok(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def missing(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("unreachable")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[MetricsInterceptor(stats)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.T", {"Ok": _unary(ok), "Missing": _unary(missing)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield stats, channel
    finally:
        server.stop(None)


def test_grpc_requests_are_timed_by_method_and_code(
    grpc_server: tuple[GrpcStats, grpc.Channel],
) -> None:
    stats, channel = grpc_server
    assert channel.unary_unary("/t.T/Ok")(b"x", timeout=5) == b"x"
    assert channel.unary_unary("/t.T/Ok")(b"y", timeout=5) == b"y"
    with pytest.raises(grpc.RpcError):
        channel.unary_unary("/t.T/Missing")(b"z", timeout=5)
    counts = {key: histogram.count for key, histogram in stats.snapshot().items()}
    assert counts == {("/t.T/Ok", "OK"): 2, ("/t.T/Missing", "NOT_FOUND"): 1}
    samples = _scrape(DaemonSnapshot("1", lazy=False, grpc=stats.snapshot()), per_layer=True)
    assert samples[("lazysnap_grpc_request_duration_seconds_count",
                    (("code", "OK"), ("method", "/t.T/Ok")))] == 2

