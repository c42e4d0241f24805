"""``[index] publish``'s job against the in-memory registry and a fake content store: what is
published, what is skipped, and each fault ending in one logged reason with nothing a reader
could trip on pushed."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from fusefs import parse_ztoc
from registry import Credentials
from snapshotter import errors
from snapshotter import soci_index as si
from snapshotter.client.containerd_api import ContentInfo
from snapshotter.daemon.config import IndexConfig
from snapshotter.daemon.index_publish import IndexPublisher, PublishJob
from snapshotter.daemon.metrics import DaemonCollector, DaemonSnapshot
from tests.registry.fake_registry import FakeRegistry, digest_of, make_client, oci_error
from tests.support import oci_image as oci

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
BIG = random.Random(4).randbytes(200_000)  # incompressible: a few 64 KiB spans
TARS = (
    oci.TarBuilder().dir("bin").file("bin/tool", b"\x7fELF" + BIG, 0o755).tar(),
    oci.TarBuilder().file("tiny", b"t").tar(),
)
SETTINGS = IndexConfig(publish=True, min_layer_size=50_000, span_size=64 * 1024)
PASSWORD = "s3cret-push-password"


class FakeContent:
    """containerd's content store of one namespace: blobs by digest."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.namespaces: list[str] = []
        self.vanishing: set[str] = set()  # listed by content_info, gone when read

    def content_info(self, digest: str) -> ContentInfo:
        if digest not in self.blobs:
            raise errors.NotFoundError(f"content digest {digest}: not found")
        return ContentInfo(digest, len(self.blobs[digest]), {})

    def read_content(self, digest: str, *, max_size: int) -> bytes:
        if digest not in self.blobs or digest in self.vanishing:
            raise errors.NotFoundError(f"content digest {digest}: not found")
        return self.blobs[digest]

    def stream_content(self, digest: str) -> Iterator[bytes]:
        data = self.read_content(digest, max_size=1 << 40)
        for start in range(0, len(data), 32 * 1024):
            yield data[start:start + 32 * 1024]

    @contextlib.contextmanager
    def open(self, namespace: str) -> Iterator[FakeContent]:
        self.namespaces.append(namespace)
        yield self


class Node:
    """One pulled image: its manifest and blobs both in the registry and in containerd."""

    def __init__(self, *, annotations: dict[str, str] | None = None) -> None:
        self.fake = FakeRegistry()
        self.content = FakeContent()
        layers = [oci.gzip_layer(tar) for tar in TARS]
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers",
                                        "diff_ids": [x.diff_id for x in layers]}}).encode()
        manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": self._add(config),
                       "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER, "digest": self._add(layer.blob),
                        "size": len(layer.blob)} for layer in layers],
        }  # fmt: skip
        if annotations:
            manifest["annotations"] = annotations
        self.body = json.dumps(manifest).encode()
        self.digest = self.fake.add_manifest(self.body, DOCKER_MANIFEST, "1")
        self.content.blobs[self.digest] = self.body
        self.layers = [(layer.blob, manifest["layers"][n]["digest"])
                       for n, layer in enumerate(layers)]
        self.job = PublishJob("reg.test/app:1", self.digest, "k8s.io")

    def _add(self, data: bytes) -> str:
        self.content.blobs[digest_of(data)] = data
        return self.fake.add_blob(data)

    @property
    def referrers_tag(self) -> str:
        return "sha256-" + self.digest.removeprefix("sha256:")

    def pushed_manifests(self) -> list[httpx.Request]:
        return [r for r in self.fake.requests
                if r.method == "PUT" and "/manifests/" in r.url.path]

    def run(
        self, settings: IndexConfig = SETTINGS, handler: Any = None,
        credentials: Credentials | None = None,
    ) -> tuple[str, dict[str, int]]:
        async def main() -> tuple[str, dict[str, int]]:
            async with make_client(self.fake, handler=handler, credentials=credentials) as client:
                publisher = IndexPublisher(client, self.content.open, settings)
                result = await publisher.publish(self.job)
                return result, publisher.counts

        return trio.run(main)


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None]]:
    return [(r.event, getattr(r, "reason", None)) for r in caplog.records
            if hasattr(r, "event")]


def test_publishes_a_v1_index_built_from_the_content_store(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = Node()
    result, counts = node.run()
    assert result == "published"
    assert counts == {"published": 1, "skipped": 0, "failed": 0}
    assert node.content.namespaces and set(node.content.namespaces) == {"k8s.io"}
    # The layers came from containerd, not from the registry.
    assert not [r for r in node.fake.requests if r.method == "GET" and "/blobs/" in r.url.path]
    listing = json.loads(node.fake.manifests[node.referrers_tag][0])
    (entry,) = listing["manifests"]
    assert entry["artifactType"] == si.SOCI_INDEX_V1
    index = si.parse(node.fake.manifests[entry["digest"]][0])
    assert index.subject == si.Subject(DOCKER_MANIFEST, node.digest, len(node.body))
    big_blob, big_digest = node.layers[0]
    assert set(index.ztocs) == {big_digest}, "the small layer is below min_layer_size"
    ztoc_digest = index.ztocs[big_digest].digest
    ztoc = parse_ztoc(node.fake.blobs[ztoc_digest], blob_size=len(big_blob),
                      ztoc_digest=ztoc_digest).index
    paths = {ztoc.path(entry).lstrip("/") for entry in range(ztoc.entry_count)}
    assert "bin/tool" in paths
    # The index manifest went up before the referrers tag that lists it.
    pushed = [r.url.path.rsplit("/", 1)[1] for r in node.pushed_manifests()]
    assert pushed == [entry["digest"], node.referrers_tag]
    assert events(caplog) == [("index_publish_started", None), ("index_published", None)]


def test_a_registry_with_the_referrers_api_gets_no_referrers_tag() -> None:
    node = Node()
    node.fake.referrers = {}
    assert node.run()[0] == "published"
    assert node.referrers_tag not in node.fake.manifests
    assert len(node.pushed_manifests()) == 1


def test_an_image_indexed_already_is_skipped_and_nothing_is_pushed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = Node()
    assert node.run()[0] == "published"
    before = len(node.fake.requests)
    result, counts = node.run()
    assert (result, counts["skipped"]) == ("skipped", 1)
    assert not [r for r in node.fake.requests[before:] if r.method in ("PUT", "POST")]
    assert events(caplog)[-1] == ("index_publish_skipped", "already_indexed")


def test_a_v2_indexed_image_is_skipped_without_a_request() -> None:
    node = Node(annotations={si.IMAGE_INDEX_DIGEST: "sha256:" + "1" * 64})
    assert node.run()[0] == "skipped"
    assert node.fake.requests == []


def test_an_image_without_a_large_enough_gzip_layer_is_skipped() -> None:
    node = Node()
    assert node.run(IndexConfig(publish=True, min_layer_size=1 << 30))[0] == "skipped"
    assert node.fake.requests == []


def test_no_push_permission_fails_as_denied_then_backs_off_and_never_logs_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = Node()
    node.fake.auth, node.fake.password = "basic", PASSWORD

    async def read_only(request: httpx.Request) -> httpx.Response:
        if request.method in ("PUT", "POST", "PATCH"):
            return oci_error(403, "DENIED", "requested access to the resource is denied")
        return await node.fake.handle(request)

    credentials = Credentials("alice", PASSWORD)

    async def main() -> list[str]:
        async with make_client(node.fake, handler=read_only, credentials=credentials) as client:
            publisher = IndexPublisher(client, node.content.open, SETTINGS)
            first = await publisher.publish(node.job)
            reads = len(node.content.namespaces)
            second = await publisher.publish(node.job)
            assert len(node.content.namespaces) == reads, "the second job read nothing"
            assert publisher.counts == {"published": 0, "skipped": 1, "failed": 1}
            return [first, second]

    assert trio.run(main) == ["failed", "skipped"]
    assert [e for e in events(caplog) if e[0] != "index_publish_started"] == [
        ("index_publish_failed", "denied"), ("index_publish_skipped", "denied_recently")]
    assert node.pushed_manifests() == []
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert PASSWORD not in caplog.text and basic not in caplog.text


def test_an_image_whose_layer_was_not_pulled_into_the_store_is_skipped_without_a_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As after a CRI pull that lazysnap served lazily: the blob never reached containerd."""
    caplog.set_level(logging.INFO)
    node = Node()
    del node.content.blobs[node.layers[0][1]]
    assert node.run()[0] == "skipped"
    assert events(caplog)[-1] == ("index_publish_skipped", "not_pulled_in_full")
    assert node.fake.requests == []


def test_content_removed_from_the_store_during_the_job_publishes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = Node()
    node.content.vanishing.add(node.layers[0][1])
    assert node.run()[0] == "failed"
    assert events(caplog)[-1] == ("index_publish_failed", "content_missing")
    assert node.pushed_manifests() == []


def test_a_manifest_gone_from_the_store_is_content_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = Node()
    del node.content.blobs[node.digest]
    assert node.run()[0] == "failed"
    assert events(caplog)[-1] == ("index_publish_failed", "content_missing")
    assert node.fake.requests == []


def test_a_blob_whose_bytes_do_not_match_its_digest_publishes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = Node()
    blob, digest = node.layers[0]
    node.content.blobs[digest] = blob[:-1] + bytes([blob[-1] ^ 1])
    assert node.run()[0] == "failed"
    assert events(caplog)[-1] == ("index_publish_failed", "digest_mismatch")
    assert node.pushed_manifests() == []
    assert not [r for r in node.fake.requests if r.method in ("PUT", "POST")]


def test_a_daemon_stopping_mid_job_logs_it_and_leaves_no_index(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = Node()
    counts: dict[str, int] = {}

    async def main() -> None:
        uploading = trio.Event()

        async def stall_uploads(request: httpx.Request) -> httpx.Response:
            if request.method == "PUT" and "/blobs/uploads/" in request.url.path:
                uploading.set()  # the first zTOC is on its way: stop the daemon now
                await trio.sleep_forever()
            return await node.fake.handle(request)

        async with make_client(node.fake, handler=stall_uploads) as client:
            publisher = IndexPublisher(client, node.content.open, SETTINGS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.publish, node.job)
                await uploading.wait()
                nursery.cancel_scope.cancel()
            counts.update(publisher.counts)

    trio.run(main)
    assert counts["failed"] == 1
    assert events(caplog)[-1] == ("index_publish_failed", "stopped")
    assert node.pushed_manifests() == [], "no index manifest without all of its zTOCs"


def test_requests_are_queued_once_per_manifest_and_run_one_at_a_time() -> None:
    node = Node()
    other = PublishJob("reg.test/other:2", "sha256:" + "b" * 64, "k8s.io")
    ran: list[str] = []

    async def main() -> list[bool]:
        async with make_client(node.fake) as client:
            publisher = IndexPublisher(client, node.content.open, SETTINGS)
            assert publisher.request(node.job) is False, "not running yet"

            async def publish(job: PublishJob) -> str:
                ran.append(job.manifest_digest)
                await trio.sleep(0.05)
                return "published"

            publisher.publish = publish  # type: ignore[method-assign]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.run)
                await trio.sleep(0.01)
                answers = [await trio.to_thread.run_sync(publisher.request, job)
                           for job in (node.job, node.job, other)]
                await trio.sleep(0.3)
                # Done: the same image may be asked for again.
                answers.append(await trio.to_thread.run_sync(publisher.request, node.job))
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
            return answers

    assert trio.run(main) == [True, False, True, True]
    assert ran == [node.digest, other.manifest_digest, node.digest]


@pytest.mark.parametrize("job", [
    PublishJob("reg.test/app:1", "sha256:abc", "default"),
    PublishJob("reg.test/app:1", "sha256:" + "A" * 64, "default"),
    PublishJob("Not A Reference", "sha256:" + "a" * 64, "default"),
    PublishJob("reg.test/app:1", "sha256:" + "a" * 64, ""),
])
def test_a_request_that_cannot_be_a_pull_s_is_invalid(job: PublishJob) -> None:
    publisher = IndexPublisher(make_client(FakeRegistry()), FakeContent().open, SETTINGS)
    with pytest.raises(errors.InvalidArgumentError):
        publisher.request(job)


def test_the_counter_is_exported_by_result() -> None:
    counts = {"published": 2, "skipped": 1, "failed": 0}
    snapshot = DaemonSnapshot("1", lazy=True, index_publish=counts)
    families = {f.name: f for f in DaemonCollector(lambda: snapshot, per_layer=True).collect()}
    samples = {s.labels["result"]: s.value for s in families["lazysnap_index_publish"].samples
               if s.name == "lazysnap_index_publish_total"}
    assert samples == {"published": 2, "skipped": 1, "failed": 0}
    off = DaemonSnapshot("1", lazy=True)
    names = {f.name for f in DaemonCollector(lambda: off, per_layer=True).collect()}
    assert "lazysnap_index_publish" not in names
