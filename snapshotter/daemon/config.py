"""The daemon's configuration: ``/etc/lazysnap/config.toml``, then command-line flags.

Every key has a documented default (docs/config.md); unknown keys are errors, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import sysconfig
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/lazysnap/config.toml")
DEFAULT_ROOT = Path("/var/lib/lazysnap")
DEFAULT_ADDRESS = Path("/run/lazysnap/lazysnap.sock")
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
DEFAULT_CACHE_CAPACITY = 10 << 30
DEFAULT_CONTAINERD_ADDRESS = Path("/run/containerd/containerd.sock")
CRI_CREDENTIALS_FILE_NAME = "cri-credentials.json"
DEFAULT_READ_DEADLINE = 20.0
# Longer than this is a hang to the container reading, and past the registry client's own
# retries: the read could only wait on an answer that will not come.
MAX_READ_DEADLINE = 600.0
DEFAULT_LONG_READ_BYTES = 24 << 20
FUSE_PASSTHROUGH_MODES = ("auto", "off")
DEFAULT_BACKGROUND_YIELD = 3.0
NEARBY_SPAN = 512 << 10  # the read path's nearby_span when [lazy] nearby_fetch is on
MAX_BACKGROUND_YIELD = 600.0
# Background ranges all lazy layers of the node hold at once, in attach order: two layers' worth
# (each holds at most eight on its own), so one image fetches as before and twenty do not
# fetch at once while their containers start (benchmarks/scale.py).
DEFAULT_BACKGROUND_RANGES = 8
MAX_BACKGROUND_RANGES = 1024


class ConfigError(Exception):
    """The configuration file or a flag is invalid; the message says which key and why."""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class LazyConfig:
    enabled: bool = True  # serve layers lazily over FUSE when containerd's labels allow it
    background_fetch: bool = True  # fetch the rest of each lazy layer after it is attached
    cache_capacity: int = DEFAULT_CACHE_CAPACITY  # bytes of chunk cache before LRU eviction
    # On SIGTERM, leave the FUSE connection to the fuse keeper instead of unmounting, so that
    # running containers' reads resume once the next daemon takes it over (a restart).
    keep_mounted_on_stop: bool = False
    # Seconds a read of a lazy file may wait for its bytes before it fails with EIO and a log
    # line. Under a minute, so that a stalled registry gives containers an error they can
    # report instead of a hang, and frees the kernel's queued READs for the other layers.
    read_deadline: float = DEFAULT_READ_DEADLINE
    # Bytes of a layer its readers fetch on demand before background fetch may run alongside
    # their misses; below that, a container is starting up and background ranges only queue
    # ahead of its reads. 0: background joins readers busy for 6 s, whatever they fetched.
    long_read_bytes: int = DEFAULT_LONG_READ_BYTES
    # Seconds after a reader waited on the link during which background fetch keeps two small
    # ranges on the link for all layers together, so that a program pausing between its misses
    # (a compiler) finds the link nearly free. 0: off (background ranges at full concurrency
    # after each quiet period).
    background_yield: float = DEFAULT_BACKGROUND_YIELD
    # Background ranges (2 MiB) all lazy layers hold at once, on the link or being decoded,
    # handed out in attach order; one while many readers wait on the link at once.
    background_ranges: int = DEFAULT_BACKGROUND_RANGES
    # A read miss close (in the layer blob) to a recent one fetches the small files around the
    # two: a package's headers or a compiler's startup objects, read in no blob order. Off by
    # default: it helped a gcc compile and slowed python's imports (benchmarks/README.md).
    nearby_fetch: bool = False
    # Exec-aware prefetch: a program being started is fetched whole with its loader and
    # libraries, and theirs, down to this depth, this many files at a time (0: off).
    exec_prefetch_depth: int = 2
    exec_prefetch_concurrency: int = 4


@dataclass(frozen=True)
class FuseConfig:
    # "auto": take FUSE passthrough when the kernel offers it (Linux >= 6.9), so files whole and
    # verified in the cache are read from a backing copy at native speed, at the price of an
    # OPEN and a RELEASE round trip per open; "off": never ask, files open without a round trip.
    passthrough: str = "off"


# The console script installed with lazysnap (pyproject.toml). Kata's shim recognises the mount
# only by this prefix of the helper's name.
KATA_HELPER_SCRIPT = "nydus-overlayfs-lazysnap"


def default_kata_helper() -> Path:
    """The helper installed beside the running lazysnap (the same environment's scripts)."""
    return Path(sysconfig.get_path("scripts")) / KATA_HELPER_SCRIPT


@dataclass(frozen=True)
class KataConfig:
    # Kata guest image pulling: container rootfs mounts carry an image_guest_pull volume.
    guest_pull: bool = False
    # The helper containerd runs to mount such a rootfs on the host, named in the mount type by
    # absolute path (None: the one installed with lazysnap).
    mount_helper: Path | None = None


@dataclass(frozen=True)
class CriConfig:
    # The CRI image service proxy's socket, for kubelet's --image-service-endpoint (None: off).
    image_service_address: Path | None = None
    # containerd's CRI socket, where the proxy forwards every image service call.
    containerd_address: Path = DEFAULT_CONTAINERD_ADDRESS
    # Where captured pull credentials are saved (None: beside the daemon socket).
    credentials_file: Path | None = None
    # kubelet's CredentialProviderConfig file and its plugins' directory (None: no providers).
    credential_provider_config: Path | None = None
    credential_provider_bin_dir: Path | None = None


DEFAULT_PULL_CONNECTIONS = 4
DEFAULT_PULL_RANGE_SIZE = 4 << 20


@dataclass(frozen=True)
class PullConfig:
    # ``lazysnap pull``: download the layers that are not lazy in ranges over several
    # connections and unpack them while they arrive, instead of through containerd's diff service.
    parallel: bool = True
    connections: int = DEFAULT_PULL_CONNECTIONS  # concurrent range requests per pull
    range_size: int = DEFAULT_PULL_RANGE_SIZE  # bytes per range request


@dataclass(frozen=True)
class RegistryConfig:
    # A hosts.toml mirror must start answering within this many seconds, or the next host is
    # asked; a mirror that failed is then tried last for a back-off (docs/registry.md).
    mirror_first_byte_timeout: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    # Where /metrics is served: "HOST:PORT" (TCP) or "unix:/absolute/path" (None: off).
    address: str | None = None
    # Label per-layer series with the layer digest; off, they are summed over layers.
    per_layer: bool = True


def parse_metrics_address(value: str, name: str) -> str:
    """``value`` if it is ``HOST:PORT`` or ``unix:/absolute/path``; ConfigError otherwise."""
    if value.startswith("unix:"):
        _path(value.removeprefix("unix:"), name)
        return value
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: {value!r} is neither HOST:PORT (such as 127.0.0.1:9464) "
                          "nor unix:/absolute/path")
    return value


# `lazysnap index`'s defaults (soci's), restated so that loading the configuration imports no
# zTOC builder; a unit test keeps them equal to snapshotter.convert.soci's.
DEFAULT_INDEX_MIN_LAYER_SIZE = 10 << 20
DEFAULT_INDEX_SPAN_SIZE = 4 << 20
INDEX_SPAN_SIZE_RANGE = (64 << 10, 1 << 30)


@dataclass(frozen=True)
class IndexConfig:
    # Build a SOCI index from an unindexed gzip image this node pulled in full and push it as a
    # v1 referrer, so that other nodes pull it lazily. Needs push credentials; off by default,
    # because every node allowed to push can then change how all nodes read the repository.
    publish: bool = False
    min_layer_size: int = DEFAULT_INDEX_MIN_LAYER_SIZE  # smaller gzip layers get no zTOC
    span_size: int = DEFAULT_INDEX_SPAN_SIZE  # uncompressed bytes between two checkpoints


@dataclass(frozen=True)
class ProfileConfig:
    # Look up each lazily pulled image's startup profile (an OCI referrer of its manifest) and
    # prefetch the files it lists alongside the container's reads. false: never look.
    prefetch: bool = True
    # Record which files each image's first container reads and push them as that profile when
    # the image has none. Needs push credentials; off by default, as for [index] publish.
    publish: bool = False
    record_seconds: float = 10.0  # recorded from the image's first read on
    max_files: int = 4096  # per layer


@dataclass(frozen=True)
class Config:
    root: Path = DEFAULT_ROOT
    address: Path = DEFAULT_ADDRESS
    hosts_dir: Path = DEFAULT_HOSTS_DIR
    log: LogConfig = field(default_factory=LogConfig)
    lazy: LazyConfig = field(default_factory=LazyConfig)
    kata: KataConfig = field(default_factory=KataConfig)
    cri: CriConfig = field(default_factory=CriConfig)
    pull: PullConfig = field(default_factory=PullConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def cri_credentials_file(self) -> Path:
        return self.cri.credentials_file or self.address.parent / CRI_CREDENTIALS_FILE_NAME


def _expect(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = table[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}{key}: expected a {kind.__name__}, got {value!r}")
    return value


def _choice(value: str, choices: tuple[str, ...], name: str) -> str:
    lowered = value.lower()
    if lowered not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return lowered


def _path(value: str, name: str) -> Path:
    if not value:
        raise ConfigError(f"{name}: must not be empty")
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"{name}: {value!r} must be an absolute path")
    return path


def _only_keys(table: Mapping[str, Any], section: str, allowed: Iterable[str]) -> None:
    extra = sorted(set(table) - set(allowed))
    if extra:
        raise ConfigError(
            f"unknown configuration keys: {', '.join(f'{section}.{key}' for key in extra)}"
        )


def _integer(value: object, name: str, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]``; TOML booleans are not integers here."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)):
        wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise ConfigError(f"{name}: expected {wanted}, got {value!r}")
    return value


def _seconds(value: object, name: str, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ConfigError(f"{name}: expected seconds, a number > 0 and <= {most:g}, "
                          f"got {value!r}")
    return float(value)


def parse_config(data: Mapping[str, Any]) -> Config:
    known = {"root", "address", "hosts_dir", "log", "lazy", "kata", "cri", "pull", "registry",
             "metrics", "index", "fuse", "profile"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    config = Config()
    if "root" in data:
        config = replace(config, root=_path(_expect(data, "root", str, ""), "root"))
    if "address" in data:
        config = replace(config, address=_path(_expect(data, "address", str, ""), "address"))
    if "hosts_dir" in data:
        config = replace(
            config, hosts_dir=_path(_expect(data, "hosts_dir", str, ""), "hosts_dir")
        )
    if "log" in data:
        table = _expect(data, "log", dict, "")
        _only_keys(table, "log", ("level", "format"))
        log = LogConfig()
        if "level" in table:
            log = replace(log, level=_choice(_expect(table, "level", str, "log."), LOG_LEVELS,
                                             "log.level"))
        if "format" in table:
            log = replace(log, format=_choice(_expect(table, "format", str, "log."), LOG_FORMATS,
                                              "log.format"))
        config = replace(config, log=log)
    if "lazy" in data:
        config = replace(config, lazy=_parse_lazy(_expect(data, "lazy", dict, "")))
    if "kata" in data:
        config = replace(config, kata=_parse_kata(_expect(data, "kata", dict, "")))
    if "cri" in data:
        config = replace(config, cri=_parse_cri(_expect(data, "cri", dict, "")))
    if "pull" in data:
        config = replace(config, pull=_parse_pull(_expect(data, "pull", dict, "")))
    if "registry" in data:
        config = replace(config, registry=_parse_registry(_expect(data, "registry", dict, "")))
    if "metrics" in data:
        config = replace(config, metrics=_parse_metrics(_expect(data, "metrics", dict, "")))
    if "index" in data:
        config = replace(config, index=_parse_index(_expect(data, "index", dict, "")))
    if "fuse" in data:
        config = replace(config, fuse=_parse_fuse(_expect(data, "fuse", dict, "")))
    if "profile" in data:
        config = replace(config, profile=_parse_profile(_expect(data, "profile", dict, "")))
    return config


def _parse_fuse(table: Mapping[str, Any]) -> FuseConfig:
    _only_keys(table, "fuse", ("passthrough",))
    fuse = FuseConfig()
    if "passthrough" in table:
        fuse = replace(fuse, passthrough=_choice(
            _expect(table, "passthrough", str, "fuse."), FUSE_PASSTHROUGH_MODES,
            "fuse.passthrough",
        ))
    return fuse


def _parse_profile(table: Mapping[str, Any]) -> ProfileConfig:
    _only_keys(table, "profile", ("prefetch", "publish", "record_seconds", "max_files"))
    profile = ProfileConfig()
    for key in ("prefetch", "publish"):
        if key in table:
            profile = replace(profile, **{key: _expect(table, key, bool, "profile.")})
    if "record_seconds" in table:
        profile = replace(profile, record_seconds=_seconds(
            table["record_seconds"], "profile.record_seconds", 600))
    if "max_files" in table:
        profile = replace(profile, max_files=_integer(
            table["max_files"], "profile.max_files", 1, 4096))
    return profile


def _parse_index(table: Mapping[str, Any]) -> IndexConfig:
    _only_keys(table, "index", ("publish", "min_layer_size", "span_size"))
    index = IndexConfig()
    if "publish" in table:
        index = replace(index, publish=_expect(table, "publish", bool, "index."))
    if "min_layer_size" in table:
        index = replace(index, min_layer_size=_integer(
            table["min_layer_size"], "index.min_layer_size", 0
        ))
    if "span_size" in table:
        index = replace(index, span_size=_integer(
            table["span_size"], "index.span_size", *INDEX_SPAN_SIZE_RANGE
        ))
    return index


def _parse_pull(table: Mapping[str, Any]) -> PullConfig:
    _only_keys(table, "pull", ("parallel", "connections", "range_size"))
    pull = PullConfig()
    if "parallel" in table:
        pull = replace(pull, parallel=_expect(table, "parallel", bool, "pull."))
    if "connections" in table:
        pull = replace(pull, connections=_integer(table["connections"], "pull.connections", 1, 64))
    if "range_size" in table:
        pull = replace(pull, range_size=_integer(
            table["range_size"], "pull.range_size", 64 << 10, 1 << 30
        ))
    return pull


def _parse_registry(table: Mapping[str, Any]) -> RegistryConfig:
    _only_keys(table, "registry", ("mirror_first_byte_timeout",))
    registry = RegistryConfig()
    if "mirror_first_byte_timeout" in table:
        registry = replace(registry, mirror_first_byte_timeout=_seconds(
            table["mirror_first_byte_timeout"], "registry.mirror_first_byte_timeout", 600
        ))
    return registry


def _parse_metrics(table: Mapping[str, Any]) -> MetricsConfig:
    _only_keys(table, "metrics", ("address", "per_layer"))
    metrics = MetricsConfig()
    if "address" in table:
        address = _expect(table, "address", str, "metrics.")
        metrics = replace(metrics, address=parse_metrics_address(address, "metrics.address"))
    if "per_layer" in table:
        metrics = replace(metrics, per_layer=_expect(table, "per_layer", bool, "metrics."))
    return metrics


def _parse_cri(table: Mapping[str, Any]) -> CriConfig:
    keys = ("image_service_address", "containerd_address", "credentials_file",
            "credential_provider_config", "credential_provider_bin_dir")
    _only_keys(table, "cri", keys)
    paths = {key: _path(_expect(table, key, str, "cri."), f"cri.{key}")
             for key in keys if key in table}
    providers = ("credential_provider_config", "credential_provider_bin_dir")
    if sum(key in paths for key in providers) == 1:
        raise ConfigError("cri.credential_provider_config and cri.credential_provider_bin_dir "
                          "go together, as kubelet's two flags do")
    return replace(CriConfig(), **paths)


def _parse_kata(table: Mapping[str, Any]) -> KataConfig:
    _only_keys(table, "kata", ("guest_pull", "mount_helper"))
    kata = KataConfig()
    if "guest_pull" in table:
        kata = replace(kata, guest_pull=_expect(table, "guest_pull", bool, "kata."))
    if "mount_helper" in table:
        helper = _path(_expect(table, "mount_helper", str, "kata."), "kata.mount_helper")
        if not helper.name.startswith("nydus-overlayfs"):
            raise ConfigError(f"kata.mount_helper: {str(helper)!r}: Kata recognises only "
                              "helpers whose file name starts with 'nydus-overlayfs'")
        kata = replace(kata, mount_helper=helper)
    return kata


def _parse_lazy(table: Mapping[str, Any]) -> LazyConfig:
    _only_keys(table, "lazy", ("enabled", "background_fetch", "cache_capacity",
                               "keep_mounted_on_stop", "read_deadline", "long_read_bytes",
                               "background_yield", "background_ranges", "nearby_fetch",
                               "exec_prefetch_depth", "exec_prefetch_concurrency"))
    lazy = LazyConfig()
    for key in ("enabled", "background_fetch", "keep_mounted_on_stop", "nearby_fetch"):
        if key in table:
            lazy = replace(lazy, **{key: _expect(table, key, bool, "lazy.")})
    if "cache_capacity" in table:
        lazy = replace(lazy, cache_capacity=_integer(
            table["cache_capacity"], "lazy.cache_capacity", 0
        ))
    if "read_deadline" in table:
        lazy = replace(lazy, read_deadline=_seconds(
            table["read_deadline"], "lazy.read_deadline", MAX_READ_DEADLINE
        ))
    if "long_read_bytes" in table:
        lazy = replace(lazy, long_read_bytes=_integer(
            table["long_read_bytes"], "lazy.long_read_bytes", 0
        ))
    if "background_yield" in table:
        value = table["background_yield"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 <= value <= MAX_BACKGROUND_YIELD
        ):
            raise ConfigError(f"lazy.background_yield: expected seconds, a number >= 0 and <= "
                              f"{MAX_BACKGROUND_YIELD:g}, got {value!r}")
        lazy = replace(lazy, background_yield=float(value))
    if "background_ranges" in table:
        lazy = replace(lazy, background_ranges=_integer(
            table["background_ranges"], "lazy.background_ranges", 1, MAX_BACKGROUND_RANGES
        ))
    if "exec_prefetch_depth" in table:
        lazy = replace(lazy, exec_prefetch_depth=_integer(
            table["exec_prefetch_depth"], "lazy.exec_prefetch_depth", 0, 8
        ))
    if "exec_prefetch_concurrency" in table:
        lazy = replace(lazy, exec_prefetch_concurrency=_integer(
            table["exec_prefetch_concurrency"], "lazy.exec_prefetch_concurrency", 0, 64
        ))
    return lazy


def load_config(path: Path | None) -> Config:
    """Read the file; a missing default file means defaults, a missing named file is an error."""
    target = path or DEFAULT_CONFIG_PATH
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"configuration file {target} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {target}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting
        raise ConfigError(f"{target}: not valid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{target}: {exc}") from None


def with_overrides(
    config: Config,
    *,
    root: str | None = None,
    address: str | None = None,
    hosts_dir: str | None = None,
    log_level: str | None = None,
    keep_mounted_on_stop: bool | None = None,
    kata_guest_pull: bool | None = None,
    cri_image_service: str | None = None,
    metrics_address: str | None = None,
) -> Config:
    """Command-line flags win over the file."""
    if metrics_address is not None:
        config = replace(config, metrics=replace(
            config.metrics,
            address=parse_metrics_address(metrics_address, "--metrics-address"),
        ))
    if kata_guest_pull is not None:
        config = replace(config, kata=replace(config.kata, guest_pull=kata_guest_pull))
    if keep_mounted_on_stop is not None:
        config = replace(
            config, lazy=replace(config.lazy, keep_mounted_on_stop=keep_mounted_on_stop)
        )
    if cri_image_service is not None:
        config = replace(config, cri=replace(
            config.cri, image_service_address=_path(cri_image_service, "--cri-image-service")
        ))
    if root is not None:
        config = replace(config, root=_path(root, "--root"))
    if address is not None:
        config = replace(config, address=_path(address, "--address"))
    if hosts_dir is not None:
        config = replace(config, hosts_dir=_path(hosts_dir, "--hosts-dir"))
    if log_level is not None:
        config = replace(
            config, log=replace(config.log, level=_choice(log_level, LOG_LEVELS, "--log-level"))
        )
    return config
