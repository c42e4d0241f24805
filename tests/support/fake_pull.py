"""Whole pulls in unit tests: an image put into the in-memory registry, and ``pull`` from there
into a fake containerd."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from registry import Platform, parse_reference
from snapshotter.client.containerd_api import ContainerdAPI
from snapshotter.client.fetch_settings import FetchSettings
from snapshotter.client.progress import LayerResult, Progress
from snapshotter.client.pull import pull
from tests.registry.fake_registry import FakeRegistry, make_client

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TAG = "1"
REF = parse_reference(f"reg.test/app:{TAG}")


class ImageParts(Protocol):
    @property
    def blobs(self) -> Sequence[bytes]: ...

    @property
    def config(self) -> bytes: ...

    @property
    def manifest_bytes(self) -> bytes: ...


def registry_with(image: ImageParts, **kwargs: object) -> FakeRegistry:
    """A registry holding the image under ``REF``; ``kwargs`` go to ``FakeRegistry``."""
    fake = FakeRegistry(**kwargs)  # type: ignore[arg-type]
    for blob in image.blobs:
        fake.add_blob(blob)
    fake.add_blob(image.config)
    fake.add_manifest(image.manifest_bytes, OCI_MANIFEST, tag=TAG)
    return fake


def pull_results(
    registry: FakeRegistry,
    containerd: ContainerdAPI,
    progress: Progress,
    parallel: FetchSettings | None = None,
) -> list[LayerResult]:
    """``pull`` of ``REF`` for linux/amd64 into the ``lazysnap`` snapshotter."""

    async def main() -> list[LayerResult]:
        async with make_client(registry) as client:
            _image, results = await pull(
                containerd, client, REF, "lazysnap", Platform("linux", "amd64"), progress,
                parallel=parallel,
            )
        return results

    return trio.run(main)
