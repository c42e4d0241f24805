"""``lazysnap pull`` telling the daemon it pulled a plain gzip image in full (``[index]
publish``): when it asks, and that the RPC never fails the pull."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

import registry
from snapshotter._proto import daemon_pb2_grpc
from snapshotter.client import daemon_client
from snapshotter.client.documents import ImageDocuments
from snapshotter.client.progress import LayerResult, Outcome
from snapshotter.client.soci_check import pulled_gzip_in_full
from snapshotter.daemon.grpc_service import DaemonServicer
from snapshotter.daemon.index_publish import PublishJob, validate_job
from snapshotter.soci_index import IMAGE_INDEX_DIGEST

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
ESTARGZ = {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "e" * 64}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image(media_type: str, annotations: dict[str, str] | None = None,
           manifest_annotations: dict[str, str] | None = None) -> ImageDocuments:
    layer = {"mediaType": media_type, "digest": _digest(b"layer"), "size": 5,
             "annotations": annotations or {}}
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(b"{}"), "size": 2},
        "layers": [layer], "annotations": manifest_annotations or {},
    }).encode()
    manifest = registry.parse_manifest(body, OCI_MANIFEST)
    assert isinstance(manifest, registry.Manifest)
    target = registry.Descriptor(OCI_MANIFEST, _digest(body), len(body))
    return ImageDocuments("reg.test/app:1", target, body, None, _digest(body), body, manifest,
                          b"{}")


def _results(outcome: Outcome) -> list[LayerResult]:
    return [LayerResult(1, 1, _digest(b"layer"), "sha256:" + "c" * 64, outcome, 5, 0.1)]


def test_only_a_plain_gzip_layer_pulled_in_full_asks_for_an_index() -> None:
    assert pulled_gzip_in_full(_image(GZIP_LAYER), _results("applied"))
    assert not pulled_gzip_in_full(_image(GZIP_LAYER), _results("remote"))
    assert not pulled_gzip_in_full(_image(GZIP_LAYER), _results("exists"))
    assert not pulled_gzip_in_full(_image(ZSTD_LAYER), _results("applied"))
    assert not pulled_gzip_in_full(_image(GZIP_LAYER, ESTARGZ), _results("applied"))
    v2 = _image(GZIP_LAYER, manifest_annotations={IMAGE_INDEX_DIGEST: "sha256:" + "1" * 64})
    assert not pulled_gzip_in_full(v2, _results("applied"))


class _Publisher:
    def __init__(self) -> None:
        self.jobs: list[PublishJob] = []

    def request(self, job: PublishJob) -> bool:
        validate_job(job)
        self.jobs.append(job)
        return True


class _NoSnapshots:
    def existing(self, keys: object) -> set[str]:
        return set()


@contextlib.contextmanager
def _serving(tmp_path: Path, publisher: _Publisher | None) -> Iterator[str]:
    """The daemon service on a unix socket, with ``publisher`` (None: publishing off)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = DaemonServicer(_NoSnapshots(), publisher=publisher)  # type: ignore[arg-type]
    daemon_pb2_grpc.add_DaemonServicer_to_server(servicer, server)
    address = str(tmp_path / "d.sock")
    server.add_insecure_port(f"unix:{address}")
    server.start()
    try:
        yield address
    finally:
        server.stop(None)


DIGEST = "sha256:" + "a" * 64


def test_the_daemon_queues_what_the_pull_names(tmp_path: Path) -> None:
    publisher = _Publisher()
    with _serving(tmp_path, publisher) as address:
        assert daemon_client.tell_image_pulled(address, "reg.test/app:1", DIGEST, "k8s.io")
    assert publisher.jobs == [PublishJob("reg.test/app:1", DIGEST, "k8s.io")]


def test_publish_off_an_invalid_request_or_no_daemon_never_fail_the_pull(tmp_path: Path) -> None:
    with _serving(tmp_path, None) as address:
        assert not daemon_client.tell_image_pulled(address, "reg.test/app:1", DIGEST, "default")
    publisher = _Publisher()
    with _serving(tmp_path, publisher) as address:
        assert not daemon_client.tell_image_pulled(address, "reg.test/app:1", "sha256:x", "ns")
    assert publisher.jobs == []
    assert not daemon_client.tell_image_pulled(
        str(tmp_path / "nobody.sock"), "reg.test/app:1", DIGEST, "default"
    )
