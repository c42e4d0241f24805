"""kubelet's ``CredentialProviderConfig`` file (``kubelet.config.k8s.io/v1``, YAML or JSON), read
as kubelet reads it, so that one file serves both.

The file names the credential provider plugins, the images each one is asked for, how long its
answers are kept by default, the plugin API version it speaks, and its arguments and
environment. A provider kubelet would refuse is left out with the reason; a file that is not a
CredentialProviderConfig at all is an error. The arguments and environment may hold secrets
of the plugin's own: they are never logged nor put in a message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from snapshotter.daemon.kubelet_image_match import BadPattern, check_pattern

CONFIG_API_VERSIONS = frozenset({
    "kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
})
PLUGIN_API_VERSIONS = frozenset({
    "credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
})
MAX_CONFIG_BYTES = 1024 * 1024
_PROVIDER_FIELDS = frozenset({
    "name", "matchImages", "defaultCacheDuration", "apiVersion", "args", "env",
    "tokenAttributes",
})
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}


class ProviderConfigError(Exception):
    """The file is not a usable CredentialProviderConfig; the message says why, never a value
    of ``args`` or ``env``."""


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float  # seconds
    api_version: str
    args: tuple[str, ...] = field(default=(), repr=False)
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    providers: tuple[ProviderConfig, ...]
    skipped: tuple[tuple[str, str], ...]  # (provider name, why it is left out)


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``12h``, ``1h30m``, ``5m0s``, ``-1s``, ``0``)."""
    value = text.strip()
    sign = -1.0 if value.startswith("-") else 1.0
    value = value.lstrip("+-")
    if value == "0":
        return 0.0
    position, total = 0, 0.0
    for found in _GO_DURATION.finditer(value):
        if found.start() != position:
            break
        total += float(found.group(1)) * _UNIT_SECONDS[found.group(2)]
        position = found.end()
    if not value or position != len(value):
        raise ValueError(f"{text!r} is not a duration such as 12h or 5m0s")
    return sign * total


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return tuple(value)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("env must be a list of {name, value}")
    pairs = []
    for item in value:
        if (not isinstance(item, Mapping) or set(item) - {"name", "value"}
                or not isinstance(item.get("name"), str) or not item["name"]
                or not isinstance(item.get("value", ""), str) or "=" in item["name"]
                or "\0" in item["name"] or "\0" in item.get("value", "")):
            raise ValueError("env must be a list of {name, value} strings")
        pairs.append((item["name"], item.get("value", "")))
    return tuple(pairs)


def _provider(raw: Mapping[str, Any]) -> ProviderConfig:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("name is required")
    if "/" in name or " " in name or name in (".", "..") or "\0" in name:
        raise ValueError("name must be a file name in the bin dir, without '/' or spaces")
    unknown = sorted(str(k) for k in set(raw) - _PROVIDER_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {', '.join(unknown)}")
    if raw.get("tokenAttributes") is not None:
        raise ValueError("tokenAttributes (service account tokens) need a pod, which lazysnap "
                         "does not have")
    api_version = raw.get("apiVersion")
    if api_version not in PLUGIN_API_VERSIONS:
        raise ValueError(f"apiVersion must be one of {', '.join(sorted(PLUGIN_API_VERSIONS))}")
    match_images = _strings(raw.get("matchImages"), "matchImages")
    if not match_images:
        raise ValueError("matchImages needs at least one entry")
    for pattern in match_images:
        try:
            check_pattern(pattern)
        except BadPattern as exc:
            raise ValueError(f"matchImages entry {pattern!r} is invalid: {exc}") from None
    duration = raw.get("defaultCacheDuration")
    if not isinstance(duration, str):
        raise ValueError("defaultCacheDuration is required (a duration such as 12h)")
    seconds = parse_go_duration(duration)
    if seconds < 0:
        raise ValueError("defaultCacheDuration must not be negative")
    return ProviderConfig(name, match_images, seconds, str(api_version),
                          _strings(raw.get("args"), "args"), _env(raw.get("env")))


def parse_provider_config(raw: bytes) -> LoadedConfig:
    """The providers of a CredentialProviderConfig document, and those left out with why."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ProviderConfigError(f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        document: Any = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError):
        # The parser's message quotes the file, and the file may hold secrets in env.
        raise ProviderConfigError("not YAML or JSON") from None
    if not isinstance(document, Mapping):
        raise ProviderConfigError("not a YAML or JSON object")
    if document.get("kind") != "CredentialProviderConfig":
        raise ProviderConfigError("kind is not CredentialProviderConfig")
    if document.get("apiVersion") not in CONFIG_API_VERSIONS:
        raise ProviderConfigError(
            f"apiVersion must be one of {', '.join(sorted(CONFIG_API_VERSIONS))}")
    providers = document.get("providers")
    if not isinstance(providers, list) or not providers:
        raise ProviderConfigError("providers must be a list of at least one provider")
    kept: list[ProviderConfig] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, item in enumerate(providers):
        label = f"providers[{index}]"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            label = item["name"][:100]
        try:
            if not isinstance(item, Mapping):
                raise ValueError("not an object")
            provider = _provider(item)
            if provider.name in seen:
                raise ValueError("a provider of the same name comes earlier")
        except ValueError as exc:
            skipped.append((label, str(exc)))
            continue
        seen.add(provider.name)
        kept.append(provider)
    return LoadedConfig(tuple(kept), tuple(skipped))


def load_provider_config(path: Path) -> LoadedConfig:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ProviderConfigError(f"cannot read it: {exc.strerror or type(exc).__name__}") from None
    return parse_provider_config(raw)
