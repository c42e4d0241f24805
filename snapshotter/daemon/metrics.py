"""The daemon's Prometheus metrics: one collector that turns counter snapshots into families.

Nothing here is on a hot path. fusefs and registry keep plain counters of their own
(``fusefs.stats``, ``registry.stats``); at each scrape the daemon copies them on the trio thread
(``DaemonSnapshot``) and this collector renders the copy. A scrape therefore costs one hop into
trio and a walk over the attached layers, never a lock on a READ.

Names follow stargz-snapshotter and soci-snapshotter (``<prefix>_fs_operation_...``), so their
dashboards port by changing the prefix; counters carry the ``_total`` suffix that
prometheus_client gives every counter. docs/observability.md lists every family and its labels.

Cardinality: the ``layer`` and ``digest`` labels take one value per attached blob, and vanish
with it; ``per_layer=False`` drops them and sums over layers, the detached ones included. Every
other label has a fixed set of values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fusefs import FETCH_KINDS, FsSnapshot, Histogram, LayerMeters, LayerSnapshot
from registry import RegistryStats

PREFIX = "lazysnap"


@dataclass(frozen=True, slots=True)
class DaemonSnapshot:
    """Copies of every counter the daemon exports, taken at one moment."""

    version: str
    lazy: bool
    fs: FsSnapshot | None = None
    registry: RegistryStats | None = None
    fallbacks: Mapping[str, int] = field(default_factory=dict)
    # (full method name, status code name) -> durations in seconds
    grpc: Mapping[tuple[str, str], Histogram] = field(default_factory=dict)
    # [index] publish jobs by result; empty while publishing is off
    index_publish: Mapping[str, int] = field(default_factory=dict)
    # (lookup, result) -> per-image registry lookups: SOCI indexes and startup profiles
    image_lookups: Mapping[tuple[str, str], int] = field(default_factory=dict)


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if bound == float("inf") else repr(bound), float(count))
            for bound, count in histogram.cumulative()]


@dataclass(frozen=True, slots=True)
class _Group:
    """The series of one ``layer`` label value: layers of one blob are summed, as two
    series with the same labels are not allowed."""

    label: tuple[str, ...]  # () without per-layer labels
    size: int
    prefetch_size: int
    meters: LayerMeters


def _groups(fs: FsSnapshot, per_layer: bool) -> list[_Group]:
    if not per_layer:
        total = fs.retired.copy()
        for layer in fs.layers:
            total.add(layer.meters)
        return [_Group((), sum(layer.size for layer in fs.layers),
                       sum(layer.prefetch_size for layer in fs.layers), total)]
    by_digest: dict[str, list[LayerSnapshot]] = {}
    for layer in fs.layers:
        by_digest.setdefault(layer.digest, []).append(layer)
    groups = []
    for digest, layers in sorted(by_digest.items()):
        meters = LayerMeters()
        for layer in layers:
            meters.add(layer.meters)
        groups.append(_Group((digest,), layers[0].size, layers[0].prefetch_size, meters))
    return groups


class DaemonCollector(Collector):
    """Renders ``source()``; a None snapshot (the daemon is stopping) renders nothing."""

    def __init__(self, source: Callable[[], DaemonSnapshot | None], *, per_layer: bool) -> None:
        self._source = source
        self._per_layer = per_layer

    def collect(self) -> Iterator[Metric]:
        snapshot = self._source()
        if snapshot is None:
            return
        info = GaugeMetricFamily(f"{PREFIX}_daemon_info", "The daemon's version and whether "
                                 "it serves layers lazily (1).", labels=["version", "lazy"])
        info.add_metric([snapshot.version, str(snapshot.lazy).lower()], 1)
        yield info
        if snapshot.fs is not None:
            yield from self._fs(snapshot.fs)
        if snapshot.registry is not None:
            yield from _registry(snapshot.registry)
        fallback = CounterMetricFamily(
            f"{PREFIX}_remote_fallback", "Layer Prepares served the ordinary way instead of "
            "lazily, by reason.", labels=["reason"])
        for reason, count in sorted(snapshot.fallbacks.items()):
            fallback.add_metric([reason], count)
        yield fallback
        grpc = HistogramMetricFamily(
            f"{PREFIX}_grpc_request_duration_seconds", "gRPC requests the daemon answered, by "
            "method and status code.", labels=["method", "code"])
        for (method, code), histogram in sorted(snapshot.grpc.items()):
            grpc.add_metric([method, code], _buckets(histogram), histogram.total)
        yield grpc
        if snapshot.lazy:
            lookups = CounterMetricFamily(
                f"{PREFIX}_image_lookups", "Per-image registry lookups of SOCI indexes and "
                "startup profiles, by lookup and result: found, absent, failed.",
                labels=["lookup", "result"])
            for (lookup, result), count in sorted(snapshot.image_lookups.items()):
                lookups.add_metric([lookup, result], count)
            yield lookups
        if snapshot.index_publish:
            yield _by_label("index_publish", "SOCI indexes this node built from images it "
                            "pulled in full ([index] publish), by result: published, skipped "
                            "(indexed already, or no layer to index), failed.", "result",
                            snapshot.index_publish)

    def _fs(self, fs: FsSnapshot) -> Iterable[Metric]:
        groups = _groups(fs, self._per_layer)
        layer = ["layer"] if self._per_layer else []
        op = ["operation_type", *layer]
        millis = HistogramMetricFamily(
            f"{PREFIX}_fs_operation_duration_milliseconds",
            "Durations of slow filesystem operations in milliseconds.", labels=op)
        micros = HistogramMetricFamily(
            f"{PREFIX}_fs_operation_duration_microseconds",
            "Durations of FUSE operations in microseconds.", labels=op)
        count = CounterMetricFamily(
            f"{PREFIX}_fs_operation_count", "Filesystem operations.", labels=op)
        served = CounterMetricFamily(
            f"{PREFIX}_fs_bytes_served", "Bytes answered to FUSE reads.", labels=layer)
        fetched = CounterMetricFamily(
            f"{PREFIX}_fs_bytes_fetched", "Compressed bytes read from layer blobs, by kind: "
            "on_demand (started by a read), prefetch, background.", labels=["kind", *layer])
        digest = ["digest"] if self._per_layer else []
        size = GaugeMetricFamily(f"{PREFIX}_fs_layer_size_bytes",
                                 "Compressed size of attached layers.", labels=digest)
        fetched_size = GaugeMetricFamily(f"{PREFIX}_fs_layer_fetched_size_bytes",
                                         "Compressed bytes fetched of attached layers.",
                                         labels=digest)
        prefetch_size = GaugeMetricFamily(f"{PREFIX}_fs_layer_prefetch_size_bytes",
                                          "Size of the prefetch (landmark) range of attached "
                                          "layers.", labels=digest)
        for group in groups:
            m = group.meters
            for name, histogram in (("mount", m.mount_millis), ("toc_get", m.toc_get_millis),
                                    ("remote_registry_get", m.registry_get_millis),
                                    ("background_fetch", m.background_millis)):
                millis.add_metric([name, *group.label], _buckets(histogram), histogram.total)
            for name, histogram in (("read_on_demand", m.read_micros),
                                    ("node_readdir", m.readdir_micros)):
                micros.add_metric([name, *group.label], _buckets(histogram), histogram.total)
            count.add_metric(["read_on_demand", *group.label], m.reads)
            count.add_metric(["node_readdir", *group.label], m.readdir_micros.count)
            count.add_metric(["remote_registry_get", *group.label], sum(m.fetches.values()))
            served.add_metric(list(group.label), m.served_bytes)
            for kind in FETCH_KINDS:
                fetched.add_metric([kind, *group.label], m.fetched_bytes[kind])
            size.add_metric(list(group.label), group.size)
            fetched_size.add_metric(list(group.label), sum(m.fetched_bytes.values()))
            prefetch_size.add_metric(list(group.label), group.prefetch_size)
        yield from (millis, micros, count, served, fetched, size, fetched_size, prefetch_size)
        yield _gauge("open_layers", "Layers attached to the FUSE mount.", len(fs.layers))
        yield from _verification(fs)
        yield _counter("fuse_takeovers", "FUSE connections this process took over from the fuse "
                       "keeper after a crash or restart.", fs.takeovers)
        yield _counter("fuse_lost_requests_answered", "Requests of the previous process, read "
                       "but never answered, that were answered EINTR after a takeover.",
                       fs.lost_requests_answered)
        yield _counter("layer_index_build_failures", "Layers whose Prepare was answered once "
                       "their TOC matched its digest, and whose index then failed to build: "
                       "every operation on such a layer answers EIO.", fs.index_build_failures)
        if fs.cache is not None:
            cache = fs.cache
            yield _counter("cache_hits", "Chunk cache loads that found the chunk.", cache.hits)
            yield _counter("cache_misses", "Chunk cache loads that did not.", cache.misses)
            yield _counter("cache_stores", "Chunks written to the cache.", cache.stores)
            yield _counter("cache_evictions", "Chunks evicted to stay under the capacity.",
                           cache.evictions)
            yield _counter("cache_evicted_bytes", "Bytes of the chunks evicted.",
                           cache.evicted_bytes)
            yield _gauge("cache_bytes", "Bytes of chunks in the cache.", cache.bytes)
            yield _gauge("cache_chunks", "Chunks in the cache.", cache.chunks)
            yield _gauge("cache_capacity_bytes", "The cache's capacity.", cache.capacity_bytes)


def _verification(fs: FsSnapshot) -> Iterable[Metric]:
    total = fs.retired.copy()
    for layer in fs.layers:
        total.add(layer.meters)
    family = CounterMetricFamily(
        f"{PREFIX}_verification_failures", "Bytes that failed their digest and were never "
        "served: chunk (fetched chunk), blob (whole-blob digest after background fetch), cache "
        "(chunk corrupt on disk).", labels=["kind"])
    family.add_metric(["chunk"], total.chunk_verify_failures)
    family.add_metric(["blob"], total.blob_verify_failures)
    family.add_metric(["cache"], fs.cache.verify_failures if fs.cache is not None else 0)
    yield family


def _registry(stats: RegistryStats) -> Iterable[Metric]:
    yield _by_label("registry_fetched_bytes", "Bytes of blob ranges read from registries, by "
                    "source: origin (the registry itself) or mirror.", "source", stats.blob_bytes)
    yield _by_label("registry_blob_reads", "Blob range reads answered, by source.", "source",
                    stats.blob_reads)
    yield _by_label("credential_lookups", "Credential lookups for a registry host, by result: "
                    "found, none, error.", "result", stats.credential_lookups)
    yield _by_label("registry_token_fetches", "Bearer token fetches (credential refreshes), by "
                    "result: ok, refused, error.", "result", stats.token_fetches)


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _by_label(name: str, doc: str, label: str, values: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def metrics_registry(
    source: Callable[[], DaemonSnapshot | None], *, per_layer: bool
) -> CollectorRegistry:
    """A registry with the process's own metrics (``process_resident_memory_bytes`` and the
    like) and lazysnap's, rendered from ``source()`` at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(DaemonCollector(source, per_layer=per_layer))
    return registry


def from_trio(
    take: Callable[[], DaemonSnapshot], token: trio.lowlevel.TrioToken
) -> Callable[[], DaemonSnapshot | None]:
    """``take`` run on the trio thread, where the counters change, for the scrape threads;
    None once trio has stopped."""

    def source() -> DaemonSnapshot | None:
        try:
            return trio.from_thread.run_sync(take, trio_token=token)
        except trio.RunFinishedError:
            return None

    return source
