"""Referrers: the OCI API, the referrers tag where the registry has no API, and hostile lists."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from registry import (
    ManifestError,
    ReferrerList,
    UnsupportedDigestError,
    fallback_tag,
    parse_reference,
    parse_referrers,
)
from registry.manifest import OCI_INDEX, OCI_MANIFEST
from tests.registry.fake_registry import FakeRegistry, digest_of, make_client

REF = parse_reference("reg.test/team/app:v1")
SUBJECT = digest_of(b"the image manifest")
SOCI = "application/vnd.amazon.soci.index.v1+json"


def _entry(body: bytes, artifact_type: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest_of(body), "size": 9}
    if artifact_type is not None:
        entry["artifactType"] = artifact_type
    return entry


def _list(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


LISTED = _list(_entry(b"soci", SOCI), _entry(b"signature", "application/vnd.dev.cosign"))


def _fetch(fake: FakeRegistry) -> ReferrerList:
    async def main() -> ReferrerList:
        async with make_client(fake) as client:
            return await client.fetch_referrers(REF, SUBJECT, SOCI)

    return trio.run(main)


def test_the_api_answer_is_read_and_filtered_by_artifact_type() -> None:
    fake = FakeRegistry(referrers={SUBJECT: LISTED})
    found = _fetch(fake)
    assert found.source == "api"
    assert [r.digest for r in found.of_type(SOCI)] == [digest_of(b"soci")]
    paths = [r.url.path for r in fake.requests]
    assert paths == [f"/v2/team/app/referrers/{SUBJECT}"]
    assert fake.requests[0].url.params["artifactType"] == SOCI


def test_without_the_api_the_referrers_tag_is_read() -> None:
    fake = FakeRegistry()  # answers 404 on the referrers route, as registry 2.8 does
    fake.add_manifest(LISTED, OCI_INDEX, tag=fallback_tag(SUBJECT))
    found = _fetch(fake)
    assert found.source == "tag"
    assert [r.digest for r in found.of_type(SOCI)] == [digest_of(b"soci")]


def test_without_the_api_nor_the_tag_there_are_none() -> None:
    found = _fetch(FakeRegistry())
    assert found.referrers == () and found.source == "tag"


def test_the_fallback_tag_is_the_digest_with_a_dash() -> None:
    assert fallback_tag(SUBJECT) == "sha256-" + SUBJECT.removeprefix("sha256:")
    with pytest.raises(UnsupportedDigestError):
        fallback_tag("latest")


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"not json",
        json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "manifests": []}).encode(),
        _list({"mediaType": OCI_MANIFEST, "digest": "sha256:xyz", "size": 1}),
        _list({"mediaType": OCI_MANIFEST, "digest": SUBJECT, "size": -1}),
        _list({**_entry(b"x", SOCI), "artifactType": 3}),
        _list({**_entry(b"x", SOCI), "annotations": {"a": 1}}),
    ],
)
def test_hostile_lists_are_manifest_errors(body: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_referrers(body, "api")
