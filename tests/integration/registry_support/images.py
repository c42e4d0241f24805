"""Small test images built in memory and pushed with the registry client."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from registry import Descriptor, RegistryClient, parse_reference
from registry.manifest import OCI_INDEX, OCI_MANIFEST, sha256_digest

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def tar_gz(files: Mapping[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def random_blob(size: int, seed: int = 0) -> bytes:
    # Incompressible and distinct per seed, built fast.
    return (seed.to_bytes(4, "big") + os.urandom(size))[:size]


@dataclass
class LayerSpec:
    data: bytes
    media_type: str = LAYER_GZIP
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class PushedImage:
    reference: str
    manifest_digest: str
    manifest: bytes
    layers: list[tuple[Descriptor, bytes]]
    config_digest: str


def config_for(arch: str = "amd64", os_name: str = "linux", diff_ids: Sequence[str] = ()) -> bytes:
    doc = {
        "architecture": arch,
        "os": os_name,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "config": {},
    }
    return json.dumps(doc, sort_keys=True).encode()


async def push_image(
    client: RegistryClient,
    reference: str,
    layers: Sequence[LayerSpec],
    *,
    arch: str = "amd64",
    chunk_size: int | None = None,
) -> PushedImage:
    ref = parse_reference(reference)
    config = config_for(arch)
    config_desc = await client.push_blob(ref, config, media_type=CONFIG)
    pushed: list[tuple[Descriptor, bytes]] = []
    for spec in layers:
        desc = await client.push_blob(
            ref, spec.data, media_type=spec.media_type, chunk_size=chunk_size
        )
        pushed.append((desc, spec.data))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_desc.digest, "size": config_desc.size},
        "layers": [
            {
                "mediaType": spec.media_type,
                "digest": desc.digest,
                "size": desc.size,
                **({"annotations": spec.annotations} if spec.annotations else {}),
            }
            for spec, (desc, _) in zip(layers, pushed, strict=True)
        ],
    }
    body = json.dumps(manifest, indent=1).encode()
    digest = await client.push_manifest(ref, body, OCI_MANIFEST)
    return PushedImage(str(ref), digest, body, pushed, config_desc.digest)


async def push_index(
    client: RegistryClient, reference: str, entries: Sequence[tuple[PushedImage, str, str]]
) -> str:
    """An OCI index over already pushed manifests: entries are (image, os, arch[/variant])."""
    ref = parse_reference(reference)
    manifests = []
    for image, os_name, arch in entries:
        arch_name, _, variant = arch.partition("/")
        platform = {"os": os_name, "architecture": arch_name}
        if variant:
            platform["variant"] = variant
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "platform": platform,
            }
        )
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    digest = await client.push_manifest(ref, body, OCI_INDEX)
    assert digest == sha256_digest(body)
    return digest
