"""An image's index, platform manifest and config byte for byte: the documents ``lazysnap pull``
stores in containerd before it unpacks.

They come from the registry (``fetch_documents``), or from the daemon's ``Daemon/Resolve``
answer (``documents_from_answer``), which the daemon built with ``fetch_documents`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from registry import Descriptor, Index, Manifest, Platform, Reference, parse_manifest
from snapshotter.client.unpacker import UnpackError
from snapshotter.daemon_api import MAX_CONFIG_BYTES, ResolveAnswer

if TYPE_CHECKING:
    # Only named: importing the client would import httpx, which the daemon path can skip.
    from registry import RegistryClient


@dataclass(frozen=True, slots=True)
class ImageDocuments:
    """An image's index (if any), platform manifest and config, byte for byte."""

    name: str  # containerd's image name: the normalised reference
    target: Descriptor  # what the name points at: the index, or the manifest
    target_content: bytes
    index: Index | None
    manifest_digest: str
    manifest_content: bytes
    manifest: Manifest
    config: bytes


async def fetch_documents(
    registry: RegistryClient, ref: Reference, platform: Platform | None
) -> ImageDocuments:
    """The registry's one resolution, then the config. Resolving is one GET by tag, and one
    more for an index."""
    image = await registry.resolve_image(ref, platform)
    config = await registry.fetch_blob(ref, image.manifest.config.digest, max_size=MAX_CONFIG_BYTES)
    return ImageDocuments(
        str(ref), image.target, image.target_content, image.index, image.manifest_digest,
        image.manifest_content, image.manifest, config,
    )


def documents_from_answer(answer: ResolveAnswer) -> ImageDocuments:
    """What ``Daemon/Resolve`` answered, parsed as a local resolution would have. containerd
    checks every digest again when the documents are stored."""
    target = Descriptor(answer.target_media_type, answer.target_digest, len(answer.target_content))
    index: Index | None = None
    if answer.has_index:
        parsed = parse_manifest(answer.target_content, answer.target_media_type)
        if not isinstance(parsed, Index):
            raise UnpackError(f"{answer.target_digest} is not an image index")
        index = parsed
    manifest = parse_manifest(answer.manifest_content, answer.manifest_media_type)
    if not isinstance(manifest, Manifest):
        raise UnpackError(f"{answer.manifest_digest} is not an image manifest")
    return ImageDocuments(
        answer.name, target, answer.target_content, index, answer.manifest_digest,
        answer.manifest_content, manifest, answer.config,
    )
