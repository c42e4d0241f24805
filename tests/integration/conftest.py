"""Fixtures for integration tests: short work directories and a test image in the registry."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import oci_image as oci
from tests.support.docker_registry import RunningRegistry


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: containerd and lazysnap sockets live there (108-byte path limit)."""
    path = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class PushedImage:
    reference: str
    layers: tuple[oci.Layer, ...]
    manifest_digest: str


@pytest.fixture(scope="session")
def busybox_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> PushedImage:
    """Two layers: busybox-static with applets, then a layer adding /etc/hello."""
    layers = (
        oci.gzip_layer(oci.busybox_tar()),
        oci.gzip_layer(
            oci.TarBuilder().dir("etc").file("etc/hello", b"hello from layer two\n").tar()
        ),
    )
    layout = tmp_path_factory.mktemp("busybox-layout")
    digest = oci.write_layout(layout, layers)
    reference = f"{docker_registry.host}/test/busybox:latest"
    oci.push_layout(layout, "latest", reference)
    return PushedImage(reference, layers, digest)
