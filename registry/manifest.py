"""OCI and Docker manifests and indexes, and platform selection (pure)."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from registry.errors import DigestMismatchError, ManifestError, PlatformNotFoundError
from registry.reference import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT_MANIFESTS = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec lets registries refuse larger


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest: the config and the layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Index:
    """An image index / manifest list: one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


_ARCH_ALIASES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def normalize_platform(p: Platform) -> Platform:
    """containerd's normalisation: arch aliases, arm64 variant v8 is the default, arm is v7."""
    arch = _ARCH_ALIASES.get(p.architecture.lower(), p.architecture.lower())
    variant = p.variant.lower() if p.variant else None
    if arch == "arm64" and variant in ("v8", "8"):
        variant = None
    elif arch == "arm" and variant is None:
        variant = "v7"
    elif variant is not None and variant.isdigit():
        variant = "v" + variant
    return Platform(p.os.lower(), arch, variant, p.os_version)


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine)
    return normalize_platform(Platform("linux", machine, variant))


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` as on docker's and containerd's command lines."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"invalid platform {text!r}: expected os/arch[/variant]")
    return normalize_platform(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None))


def verify_digest(content: bytes, digest: str) -> None:
    validate_digest(digest)
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, content).hexdigest()
    if actual != expected:
        raise DigestMismatchError(f"content is {algorithm}:{actual}, expected {digest}")


def sha256_digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"{where}: annotations must map strings to strings")
    return dict(value)


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: descriptor is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise ManifestError(f"{where}: descriptor needs mediaType and digest strings")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: descriptor size must be a non-negative integer")
    try:
        validate_digest(digest)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    platform = None
    raw_platform = raw.get("platform")
    if isinstance(raw_platform, dict):
        os_name, arch = raw_platform.get("os"), raw_platform.get("architecture")
        if not isinstance(os_name, str) or not isinstance(arch, str):
            raise ManifestError(f"{where}: platform needs os and architecture")
        variant = raw_platform.get("variant")
        os_version = raw_platform.get("os.version")
        platform = Platform(
            os_name,
            arch,
            variant if isinstance(variant, str) and variant else None,
            os_version if isinstance(os_version, str) else None,
        )
    urls = raw.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestError(f"{where}: urls must be a list of strings")
    return Descriptor(
        media_type, digest, size, _str_map(raw.get("annotations"), where), platform, tuple(urls)
    )


def _media_type(doc: dict[str, Any], header_type: str | None) -> str:
    body_type = doc.get("mediaType")
    header = (header_type or "").split(";", 1)[0].strip()
    if isinstance(body_type, str) and body_type:
        return body_type
    if header in INDEX_TYPES | MANIFEST_TYPES:
        return header
    # OCI allows omitting mediaType; the shape tells which document it is.
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    return header or "unknown"


def parse_manifest(body: bytes, content_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index body; raise ``ManifestError`` for anything else."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(body)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # deep nesting exhausts the decoder's stack
        raise ManifestError("manifest is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    media_type = _media_type(doc, content_type)
    if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestError("Docker schema 1 manifests are not supported")
    annotations = _str_map(doc.get("annotations"), "manifest")
    if media_type in INDEX_TYPES:
        raw = doc.get("manifests")
        if not isinstance(raw, list):
            raise ManifestError("index has no manifests list")
        items = tuple(_descriptor(m, f"manifests[{i}]") for i, m in enumerate(raw))
        return Index(media_type, items, annotations)
    if media_type in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("manifest has no layers list")
        config = _descriptor(doc.get("config"), "config")
        return Manifest(
            media_type,
            config,
            tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers)),
            annotations,
        )
    raise ManifestError(f"unsupported manifest media type {media_type!r}")


def _matches(candidate: Platform, wanted: Platform, *, exact_variant: bool) -> bool:
    c, w = normalize_platform(candidate), normalize_platform(wanted)
    if (c.os, c.architecture) != (w.os, w.architecture):
        return False
    if exact_variant:
        return c.variant == w.variant
    # An unspecified variant in the image runs anywhere the arch does.
    return c.variant is None or w.variant is None


def select_manifest(index: Index, wanted: Platform | None = None) -> Descriptor:
    """The index entry for ``wanted``, by default this machine; exact variant preferred."""
    target = wanted or host_platform()
    candidates: Sequence[Descriptor] = [
        d for d in index.manifests if d.platform is not None and d.media_type in MANIFEST_TYPES
    ]
    for exact in (True, False):
        for descriptor in candidates:
            assert descriptor.platform is not None
            if _matches(descriptor.platform, target, exact_variant=exact):
                return descriptor
    available = ", ".join(str(d.platform) for d in candidates) or "none"
    raise PlatformNotFoundError(f"no manifest for platform {target} (available: {available})")
