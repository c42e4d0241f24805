"""``[profile] publish`` against the in-memory registry: what one node records is pushed as a
referrer of the image manifest and found by the next pull's lookup; an image that has a profile
is not profiled again; a refused push is one logged reason and never logs the password."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence

import httpx
import pytest
import trio

from fusefs import FirstRead
from registry import Credentials, Reference
from snapshotter.daemon.config import ProfileConfig
from snapshotter.daemon.profile_publish import ProfilePublisher, _Job
from snapshotter.remote.layers import ProfiledLayer
from snapshotter.remote.profiles import StartupProfiles
from snapshotter.startup_profile import (
    ARTIFACT_TYPE,
    ProfiledFile,
    StartupProfile,
    artifact_manifest,
    render,
)
from tests.registry.fake_registry import FakeRegistry, make_client, oci_error

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64
PASSWORD = "s3cret-push-password"
SETTINGS = ProfileConfig(publish=True, record_seconds=0.2)


def image(fake: FakeRegistry) -> str:
    body = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "layers": []}).encode()
    return fake.add_manifest(body, MANIFEST, "1")


class Reads:
    """What fusefs recorded per layer id; reads start when the test says."""

    def __init__(self) -> None:
        self.reads: dict[str, list[FirstRead]] = {}

    def __call__(self, layer_id: str) -> Sequence[FirstRead]:
        return self.reads.get(layer_id, [])

    def start(self, late: float) -> None:
        now = trio.current_time()
        self.reads["l1"] = [FirstRead(now, "/usr/bin/python3", 4096),
                            FirstRead(now + 0.01, "/usr/lib/libpython.so", 1 << 20),
                            FirstRead(now + late, "/srv/late", 1)]
        self.reads["l2"] = [FirstRead(now + 0.02, "/app/main.py", 100)]


def _attach(publisher: ProfilePublisher, digest: str) -> None:
    publisher.attached(ProfiledLayer("reg.test/app:1", digest, LAYER_A, "l1"))
    publisher.attached(ProfiledLayer("reg.test/app:1", digest, LAYER_B, "l2"))


def test_a_recorded_start_is_published_and_found_by_the_next_pull(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeRegistry()
    digest = image(fake)

    async def main() -> None:
        async with make_client(fake) as client, trio.open_nursery() as nursery:
            reads = Reads()
            publisher = ProfilePublisher(client, reads, SETTINGS)
            await nursery.start(publisher.run)
            _attach(publisher, digest)
            _attach(publisher, digest)  # a second pull of the image: still one job
            await trio.sleep(0.3)
            reads.start(late=5.0)  # the container starts a while after the pull
            with trio.fail_after(5):
                while publisher.counts["published"] == 0:
                    await trio.sleep(0.05)
            _attach(publisher, digest)  # handled: no second job
            await trio.sleep(0.01)
            assert publisher.counts == {"published": 1, "skipped": 0, "failed": 0}

            profile = await StartupProfiles(client).profile_of(Reference("reg.test", "app"),
                                                               digest)
            assert profile is not None
            assert profile.files_of(LAYER_A) == (ProfiledFile("/usr/bin/python3", 4096),
                                                 ProfiledFile("/usr/lib/libpython.so", 1 << 20))
            assert profile.files_of(LAYER_B) == (ProfiledFile("/app/main.py", 100),)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert [getattr(r, "event", None) for r in caplog.records
            if r.name.endswith("profile_publish")] == ["startup_profile_published"]
    # The registry has no referrers API: the referrers tag lists the profile.
    tag = fake.manifests["sha256-" + digest.removeprefix("sha256:")][0]
    assert [m["artifactType"] for m in json.loads(tag)["manifests"]] == [ARTIFACT_TYPE]


def test_an_image_that_has_a_profile_is_not_profiled_again() -> None:
    fake = FakeRegistry()
    digest = image(fake)

    async def main() -> None:
        async with make_client(fake) as client:
            reads = Reads()
            reads.start(late=0.0)
            for _ in range(2):
                job = _Job("reg.test/app:1", digest, {"l1": LAYER_A})
                publisher = ProfilePublisher(client, reads, SETTINGS)
                try:
                    await publisher.publish(job)
                except Exception as exc:
                    assert str(exc) == "already_profiled"

    trio.run(main)
    pushed = [r for r in fake.requests if r.method == "PUT" and "/manifests/" in r.url.path]
    assert len(pushed) == 2  # the profile and the referrers tag, once


def test_a_refused_push_fails_as_denied_and_never_logs_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeRegistry()
    fake.auth, fake.password = "basic", PASSWORD
    digest = image(fake)

    async def read_only(request: httpx.Request) -> httpx.Response:
        if request.method in ("PUT", "POST", "PATCH"):
            return oci_error(403, "DENIED", "requested access to the resource is denied")
        return await fake.handle(request)

    async def main() -> None:
        async with make_client(fake, handler=read_only,
                               credentials=Credentials("alice", PASSWORD)) as client, \
                trio.open_nursery() as nursery:
            reads = Reads()
            publisher = ProfilePublisher(client, reads, SETTINGS)
            await nursery.start(publisher.run)
            _attach(publisher, digest)
            reads.start(late=0.0)
            with trio.fail_after(5):
                while publisher.counts["failed"] == 0:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert [(getattr(r, "event", None), getattr(r, "reason", None)) for r in caplog.records
            if r.name.endswith("profile_publish")] == [("startup_profile_publish_failed",
                                                         "denied")]
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert PASSWORD not in caplog.text and basic not in caplog.text


def test_the_lookup_refuses_a_profile_about_another_manifest_or_too_large() -> None:
    fake = FakeRegistry()
    digest = image(fake)
    other = "sha256:" + "c" * 64
    body = render(StartupProfile({LAYER_A: (ProfiledFile("/x", 1),)}))
    blob = fake.add_blob(body)
    wrong_subject = fake.add_manifest(
        artifact_manifest(body, MANIFEST, other, 10, "2026-01-01T00:00:00Z"), MANIFEST)
    huge = json.loads(artifact_manifest(body, MANIFEST, digest, 10, "2026-01-02T00:00:00Z"))
    huge["layers"][0]["size"] = 1 << 30
    too_large = fake.add_manifest(json.dumps(huge).encode(), MANIFEST)
    listing = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
               "manifests": [{"mediaType": MANIFEST, "digest": d, "size": 1,
                              "artifactType": ARTIFACT_TYPE}
                             for d in (wrong_subject, too_large)]}
    fake.add_manifest(json.dumps(listing).encode(), "application/vnd.oci.image.index.v1+json",
                      "sha256-" + digest.removeprefix("sha256:"))

    async def main() -> None:
        async with make_client(fake) as client:
            found = await StartupProfiles(client).profile_of(Reference("reg.test", "app"), digest)
            assert found is None

    trio.run(main)
    assert not any(blob in str(r.url) for r in fake.requests)  # the blob was never fetched
