"""After a PullImage through the CRI proxy: the manifest containerd pulled is found from its
image record (directly, or through the image index for this platform) and its publish job is
queued; anything that cannot be found is logged and dropped."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from registry import Descriptor, Platform
from snapshotter import errors
from snapshotter.client.containerd_api import ImageRecord
from snapshotter.daemon.cri_pulled import (
    CRI_NAMESPACE,
    LookupFailed,
    PulledImages,
    pulled_manifest,
)
from snapshotter.daemon.index_publish import PublishJob

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class FakeImages:
    """containerd's images and content of one namespace."""

    def __init__(self) -> None:
        self.images: dict[str, ImageRecord] = {}
        self.blobs: dict[str, bytes] = {}
        self.namespaces: list[str] = []

    def get_image(self, name: str) -> ImageRecord:
        if name not in self.images:
            raise errors.NotFoundError(f"image {name}: not found")
        return self.images[name]

    def read_content(self, digest: str, *, max_size: int) -> bytes:
        if digest not in self.blobs:
            raise errors.NotFoundError(f"content digest {digest}: not found")
        return self.blobs[digest]

    @contextlib.contextmanager
    def open(self, namespace: str) -> Iterator[FakeImages]:
        self.namespaces.append(namespace)
        yield self

    def add_index(self, name: str, manifests: dict[Platform, str]) -> str:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": 500,
             "platform": {"os": p.os, "architecture": p.architecture}}
            for p, digest in manifests.items()
        ]}).encode()
        digest = _digest(body)
        self.blobs[digest] = body
        self.images[name] = ImageRecord(name, Descriptor(OCI_INDEX, digest, len(body)))
        return digest


MANIFEST_AMD64 = "sha256:" + "a" * 64
MANIFEST_ARM64 = "sha256:" + "b" * 64


def test_an_image_naming_a_manifest_is_that_manifest() -> None:
    store = FakeImages()
    name = "reg.test:5000/team/app:1"
    store.images[name] = ImageRecord(name, Descriptor(OCI_MANIFEST, MANIFEST_AMD64, 500))
    assert pulled_manifest(store, name, AMD64) == (name, MANIFEST_AMD64)


def test_an_image_naming_an_index_is_this_platforms_manifest() -> None:
    store = FakeImages()
    store.add_index("docker.io/library/app:1", {ARM64: MANIFEST_ARM64, AMD64: MANIFEST_AMD64})
    # kubelet may send the short name; containerd records the normalised one.
    assert pulled_manifest(store, "app:1", AMD64) == ("docker.io/library/app:1", MANIFEST_AMD64)
    assert pulled_manifest(store, "app:1", ARM64)[1] == MANIFEST_ARM64


def test_an_index_whose_bytes_do_not_match_its_digest_is_refused() -> None:
    store = FakeImages()
    digest = store.add_index("reg.test/app:1", {AMD64: MANIFEST_AMD64})
    store.blobs[digest] = store.blobs[digest].replace(b"amd64", b"arm64")
    with pytest.raises(LookupFailed):
        pulled_manifest(store, "reg.test/app:1", AMD64)


def test_a_string_that_is_not_a_reference_is_refused_without_being_echoed() -> None:
    secret = "user:Sup3r-secret@@"
    with pytest.raises(LookupFailed) as failure:
        pulled_manifest(FakeImages(), secret, AMD64)
    assert secret not in str(failure.value)


def _run_lookups(store: FakeImages, images: list[str]) -> list[PublishJob]:
    queued: list[PublishJob] = []
    done = threading.Event()

    def request(job: PublishJob) -> bool:
        queued.append(job)
        return True

    pulled = PulledImages(store.open, request, AMD64)
    for image in images:
        pulled.pulled(image)
    pulled._lookups.submit(done.set)  # the one lookup thread runs in order
    assert done.wait(10)
    pulled.close()
    return queued


def test_a_pulled_image_queues_its_job_in_the_cri_namespace() -> None:
    store = FakeImages()
    store.add_index("reg.test/app:1", {AMD64: MANIFEST_AMD64})
    assert _run_lookups(store, ["reg.test/app:1"]) == [
        PublishJob("reg.test/app:1", MANIFEST_AMD64, CRI_NAMESPACE)
    ]
    assert store.namespaces == [CRI_NAMESPACE]


def test_an_image_containerd_does_not_have_is_logged_and_later_pulls_still_queue(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    store = FakeImages()
    store.add_index("reg.test/app:1", {AMD64: MANIFEST_AMD64})
    queued = _run_lookups(store, ["reg.test/gone:1", "reg.test/app:1"])
    assert [job.manifest_digest for job in queued] == [MANIFEST_AMD64]
    assert [getattr(r, "event", None) for r in caplog.records] == [
        "index_publish_lookup_failed"
    ]
