"""Registry hosts, configured with containerd's ``certs.d/<host>/hosts.toml`` convention.

``parse_hosts_toml`` is pure: text in, hosts out. ``HostsConfig`` finds and reads the files of a
hosts directory. It is set by the config key ``hosts_dir``, the flag ``--hosts-dir`` or the
environment ``LAZYSNAP_HOSTS_DIR``, and defaults to ``/etc/containerd/certs.d``.

Hosts are tried in order: the ``[host."..."]`` mirrors as written, then the ``server``. As in
containerd, the server defaults to ``https://<registry>``, to ``https://registry-1.docker.io``
for ``docker.io``, and to plain HTTP for loopback registries.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import HostsConfigError

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
HOSTS_DIR_ENV = "LAZYSNAP_HOSTS_DIR"
DOCKER_HUB_SERVER = "https://registry-1.docker.io"
CAPABILITIES = frozenset({"pull", "resolve", "push"})


@dataclass(frozen=True, slots=True)
class ClientCert:
    cert: Path
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class RegistryHost:
    """One endpoint to try for a registry. ``api_url`` ends at the API root (usually ``/v2``)."""

    api_url: str
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca_files: tuple[Path, ...] = ()
    client_certs: tuple[ClientCert, ...] = ()
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    is_mirror: bool = False
    # The registry this host stands in for, sent as ``?ns=`` on every request to it as
    # containerd does; None when the host is that registry. Set by ``with_namespace``.
    namespace: str | None = None
    dial_timeout: float | None = None  # seconds; hosts.toml ``dial_timeout``

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        """The URL of ``path`` under the API root, with ``query`` and then ``ns``."""
        params = dict(query or {})
        if self.namespace is not None:
            params["ns"] = self.namespace
        suffix = "?" + urllib.parse.urlencode(params) if params else ""
        return f"{self.api_url}/{path}{suffix}"

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.api_url).scheme

    @property
    def netloc(self) -> str:
        """``host[:port]`` as it appears in URLs: the key for credentials and auth state."""
        return urllib.parse.urlsplit(self.api_url).netloc

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def is_loopback_host(registry: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``[::1]`` with or without a port."""
    host = registry
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _names_registry(netloc: str, registry: str) -> bool:
    # Host names are case-insensitive. Docker Hub's API lives on another name than its images.
    netloc, registry = netloc.lower(), registry.lower()
    return netloc == registry or (registry == "docker.io" and netloc == "registry-1.docker.io")


def with_namespace(hosts: Sequence[RegistryHost], registry: str) -> list[RegistryHost]:
    """``hosts`` with ``namespace`` set on each one that is not ``registry`` itself.

    As in containerd, this compares host names, not whether the entry is a ``[host]`` mirror:
    a ``server`` elsewhere is a proxy too, and the ``override_path`` of a host changes nothing.
    """
    return [
        host if _names_registry(host.netloc, registry)
        else dataclasses.replace(host, namespace=registry)
        for host in hosts
    ]


def default_server(registry: str) -> str:
    if registry == "docker.io":
        return DOCKER_HUB_SERVER
    scheme = "http" if is_loopback_host(registry) else "https"
    return f"{scheme}://{registry}"


def _api_url(url: str, *, override_path: bool, where: str) -> str:
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # such as an unclosed IPv6 literal
        raise HostsConfigError(f"{where}: {exc} in {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise HostsConfigError(f"{where}: unsupported scheme in {url!r} (http or https)")
    if not parts.netloc:
        raise HostsConfigError(f"{where}: no host in {url!r}")
    path = parts.path.rstrip("/")
    if not override_path and not path.endswith("/v2"):
        path += "/v2"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def default_hosts(registry: str) -> list[RegistryHost]:
    return [RegistryHost(_api_url(default_server(registry), override_path=False, where=registry))]


def _as_list(value: Any, key: str, where: str) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [value]
    raise HostsConfigError(f"{where}: {key} must be a string or a list")


def _path(value: Any, base_dir: Path, key: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise HostsConfigError(f"{where}: {key} entries must be non-empty strings")
    path = Path(value)
    return path if path.is_absolute() else base_dir / path


def _client_certs(value: Any, base_dir: Path, where: str) -> tuple[ClientCert, ...]:
    certs = []
    for item in _as_list(value, "client", where):
        if isinstance(item, list):
            if len(item) not in (1, 2):
                raise HostsConfigError(f"{where}: client pairs are [cert, key]")
            key = _path(item[1], base_dir, "client", where) if len(item) == 2 else None
            certs.append(ClientCert(_path(item[0], base_dir, "client", where), key))
        else:
            certs.append(ClientCert(_path(item, base_dir, "client", where)))
    return tuple(certs)


def _headers(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise HostsConfigError(f"{where}: header must be a table")
    headers: dict[str, tuple[str, ...]] = {}
    for name, values in value.items():
        items = _as_list(values, f"header {name}", where)
        if not all(isinstance(v, str) for v in items):
            raise HostsConfigError(f"{where}: header {name} values must be strings")
        headers[name] = tuple(items)
    return headers


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
             "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration such as ``1s``, ``500ms`` or ``1m30s``, as containerd reads
    ``dial_timeout``. Raises ``ValueError`` for anything else, negative durations included."""
    if not text:
        raise ValueError("empty duration")
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(text):
        match = _GO_DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(f"not a duration: {text!r} (such as 1s, 500ms or 1m30s)")
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        position = match.end()
    return total


def _dial_timeout(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise HostsConfigError(f"{where}: dial_timeout must be a string such as \"1s\"")
    try:
        seconds = parse_go_duration(value)
    except ValueError as exc:
        raise HostsConfigError(f"{where}: dial_timeout: {exc}") from None
    return seconds or None  # zero sets no limit of its own: the client's connect timeout applies


def _host_entry(
    url: str, table: Mapping[str, Any], base_dir: Path, where: str, *, is_mirror: bool
) -> RegistryHost:
    known = {
        "capabilities", "skip_verify", "ca", "client", "header", "override_path", "dial_timeout"
    }
    unknown = set(table) - known - {"server", "host"}
    if unknown:
        # containerd ignores unknown keys; we say so, since a typo silently changes behaviour.
        log.warning("hosts-config unknown-keys=%s where=%s", ",".join(sorted(unknown)), where)
    caps_value = table.get("capabilities", sorted(CAPABILITIES))
    caps = _as_list(caps_value, "capabilities", where)
    bad = [c for c in caps if not isinstance(c, str) or c not in CAPABILITIES]
    if bad:
        raise HostsConfigError(f"{where}: unknown capabilities {bad} (pull, resolve, push)")
    skip_verify = table.get("skip_verify", False)
    override_path = table.get("override_path", False)
    if not isinstance(skip_verify, bool) or not isinstance(override_path, bool):
        raise HostsConfigError(f"{where}: skip_verify and override_path must be booleans")
    cas = tuple(_path(c, base_dir, "ca", where) for c in _as_list(table.get("ca", []), "ca", where))
    return RegistryHost(
        api_url=_api_url(url, override_path=override_path, where=where),
        capabilities=frozenset(caps),
        skip_verify=skip_verify,
        ca_files=cas,
        client_certs=_client_certs(table.get("client", []), base_dir, where),
        headers=_headers(table.get("header", {}), where),
        is_mirror=is_mirror,
        dial_timeout=_dial_timeout(table.get("dial_timeout"), where),
    )


def parse_hosts_toml(
    text: str, registry: str, *, base_dir: Path, source: str = "hosts.toml"
) -> list[RegistryHost]:
    """The hosts to try for ``registry`` according to one hosts.toml text, in order."""
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:  # deep nesting exhausts the stack
        raise HostsConfigError(f"{source}: invalid TOML: {exc}") from exc
    hosts: list[RegistryHost] = []
    mirrors = doc.get("host", {})
    if not isinstance(mirrors, dict):
        raise HostsConfigError(f"{source}: host must be a table of tables")
    for url, table in mirrors.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f"{source}: host.{url!r} must be a table")
        where = f"{source} host.{url!r}"
        hosts.append(_host_entry(url, table, base_dir, where, is_mirror=True))
    server = doc.get("server", default_server(registry))
    if not isinstance(server, str):
        raise HostsConfigError(f"{source}: server must be a string")
    hosts.append(_host_entry(server, doc, base_dir, f"{source} server", is_mirror=False))
    return hosts


def _legacy_certs(directory: Path, registry: str) -> list[RegistryHost]:
    """docker's older certs.d layout: ``*.crt`` CAs and ``*.cert``/``*.key`` client pairs."""
    cas = tuple(sorted(directory.glob("*.crt")))
    clients = tuple(
        ClientCert(cert, cert.with_suffix(".key")) for cert in sorted(directory.glob("*.cert"))
    )
    (host,) = default_hosts(registry)
    https = host.api_url.replace("http://", "https://", 1) if cas or clients else host.api_url
    return [RegistryHost(https, ca_files=cas, client_certs=clients)]


def resolve_hosts_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """The hosts directory: an explicit value, else ``$LAZYSNAP_HOSTS_DIR``, else the default."""
    if configured:
        return Path(configured)
    return Path(os.environ.get(HOSTS_DIR_ENV) or DEFAULT_HOSTS_DIR)


class HostsConfig:
    """The hosts of each registry, read from a containerd-style hosts directory on demand."""

    def __init__(self, hosts_dir: str | os.PathLike[str] | None = None) -> None:
        self.hosts_dir = resolve_hosts_dir(hosts_dir)

    def __repr__(self) -> str:
        return f"HostsConfig(hosts_dir={str(self.hosts_dir)!r})"

    def hosts_for(self, registry: str) -> list[RegistryHost]:
        """The endpoints for ``registry`` (``host[:port]``), mirrors first, the server last."""
        for name in (registry, "_default"):
            directory = self.hosts_dir / name
            hosts_file = directory / "hosts.toml"
            try:
                text = hosts_file.read_text()
            except FileNotFoundError:
                if name == registry and directory.is_dir():
                    return _legacy_certs(directory, registry)
                continue
            except OSError as exc:
                raise HostsConfigError(f"cannot read {hosts_file}: {exc}") from exc
            return parse_hosts_toml(text, registry, base_dir=directory, source=str(hosts_file))
        return default_hosts(registry)
