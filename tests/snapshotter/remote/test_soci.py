"""Finding an image's SOCI index: v2 by the manifest's digest, v1 through referrers (API or
tag), once per image; anything wrong is "no index", never an error on the Prepare path."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from registry import Reference, fallback_tag, parse_reference
from registry.manifest import OCI_INDEX, OCI_MANIFEST
from snapshotter.remote.soci import ABSENT_INDEX_SECONDS, FAILED_LOOKUP_SECONDS, SociIndexes
from snapshotter.soci_index import (
    SOCI_INDEX_V1,
    SociIndex,
    Subject,
    ZtocDescriptor,
    build,
)
from tests.registry.fake_registry import FakeRegistry, digest_of, make_client

REF = parse_reference("reg.test/team/app:v1")
MANIFEST = digest_of(b"the image manifest")
LAYER = digest_of(b"a gzip layer")
ZTOC = ZtocDescriptor(
    digest_of(b"a ztoc"), 6, LAYER, "application/vnd.oci.image.layer.v1.tar+gzip"
)


def _index(version: int, subject: str | None = MANIFEST) -> bytes:
    return build(
        SociIndex(
            version,  # type: ignore[arg-type]
            {LAYER: ZTOC},
            Subject(OCI_MANIFEST, subject, 100) if version == 1 and subject else None,
        )
    )


def _referrers(*bodies: bytes) -> bytes:
    entries = [
        {"mediaType": OCI_MANIFEST, "digest": digest_of(b), "size": len(b),
         "artifactType": SOCI_INDEX_V1}
        for b in bodies
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def _lookup(
    fake: FakeRegistry, index_digest: str | None, times: int = 1, ref: Reference = REF
) -> tuple[list[ZtocDescriptor | None], int]:
    async def main() -> tuple[list[ZtocDescriptor | None], int]:
        async with make_client(fake) as client:
            indexes = SociIndexes(client)
            found: list[ZtocDescriptor | None] = []

            async def one() -> None:
                found.append(await indexes.ztoc_for(ref, MANIFEST, index_digest, LAYER))

            async with trio.open_nursery() as nursery:
                for _ in range(times):
                    nursery.start_soon(one)
            return found, indexes.requests

    return trio.run(main)


def test_v2_is_fetched_by_the_digest_the_manifest_names() -> None:
    fake = FakeRegistry()
    body = _index(2)
    digest = fake.add_manifest(body, OCI_MANIFEST)
    found, _ = _lookup(fake, digest)
    assert found == [ZTOC]
    assert [r.url.path for r in fake.requests] == [f"/v2/team/app/manifests/{digest}"]


def test_v1_through_the_referrers_tag_of_a_registry_without_the_api() -> None:
    fake = FakeRegistry()
    body = _index(1)
    fake.add_manifest(body, OCI_MANIFEST)
    fake.add_manifest(_referrers(body), OCI_INDEX, tag=fallback_tag(MANIFEST))
    assert _lookup(fake, None)[0] == [ZTOC]


def test_v1_through_the_referrers_api() -> None:
    body = _index(1)
    fake = FakeRegistry(referrers={MANIFEST: _referrers(body)})
    fake.add_manifest(body, OCI_MANIFEST)
    assert _lookup(fake, None)[0] == [ZTOC]


def test_a_v1_index_for_another_manifest_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    body = _index(1, subject=digest_of(b"another manifest"))
    fake = FakeRegistry(referrers={MANIFEST: _referrers(body)})
    fake.add_manifest(body, OCI_MANIFEST)
    with caplog.at_level(logging.WARNING):
        assert _lookup(fake, None)[0] == [None]
    assert "subject is another manifest" in caplog.text


def test_a_v2_digest_naming_a_v1_index_is_refused() -> None:
    fake = FakeRegistry()
    digest = fake.add_manifest(_index(1), OCI_MANIFEST)
    assert _lookup(fake, digest)[0] == [None]


def test_one_lookup_per_image_for_all_its_layers() -> None:
    body = _index(1)
    fake = FakeRegistry(referrers={MANIFEST: _referrers(body)})
    fake.add_manifest(body, OCI_MANIFEST)
    found, lookups = _lookup(fake, None, times=5)
    assert found == [ZTOC] * 5 and lookups == 1
    assert sum("/referrers/" in r.url.path for r in fake.requests) == 1


def test_a_failed_lookup_is_no_index_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRegistry()  # the v2 index the manifest names is missing
    with caplog.at_level(logging.WARNING):
        assert _lookup(fake, digest_of(b"gone"))[0] == [None]
    assert "soci index lookup failed" in caplog.text


def _lookups_over_time(
    fake: FakeRegistry, index_digest: str | None, waits: list[float]
) -> tuple[list[ZtocDescriptor | None], int]:
    """One lookup, then one more after each wait (in seconds of a mock clock). The clock moves
    only when told: an autojumping one fires the lookup's timeout while the client works."""
    clock = trio.testing.MockClock()

    async def main() -> tuple[list[ZtocDescriptor | None], int]:
        async with make_client(fake) as client:
            indexes = SociIndexes(client)
            found = [await indexes.ztoc_for(REF, MANIFEST, index_digest, LAYER)]
            for wait in waits:
                clock.jump(wait)
                found.append(await indexes.ztoc_for(REF, MANIFEST, index_digest, LAYER))
            return found, indexes.requests

    return trio.run(main, clock=clock)


def test_a_failed_lookup_is_tried_again_after_a_short_while() -> None:
    fake = FakeRegistry()
    body = _index(2)
    digest = digest_of(body)
    found: list[ZtocDescriptor | None] = []
    clock = trio.testing.MockClock()

    async def main() -> int:
        async with make_client(fake) as client:
            indexes = SociIndexes(client)
            # Missing at first, as during a registry hiccup, then there.
            found.append(await indexes.ztoc_for(REF, MANIFEST, digest, LAYER))
            fake.add_manifest(body, OCI_MANIFEST)
            clock.jump(FAILED_LOOKUP_SECONDS - 1)
            found.append(await indexes.ztoc_for(REF, MANIFEST, digest, LAYER))
            clock.jump(2)
            found.append(await indexes.ztoc_for(REF, MANIFEST, digest, LAYER))
            return indexes.requests

    assert trio.run(main, clock=clock) == 2
    assert found == [None, None, ZTOC]


def test_no_v1_index_is_believed_for_minutes_then_asked_again() -> None:
    referrers = {MANIFEST: _referrers()}
    fake = FakeRegistry(referrers=referrers)
    found, lookups = _lookups_over_time(fake, None, [60.0, ABSENT_INDEX_SECONDS])
    assert found == [None, None, None] and lookups == 2
    # A v1 index published meanwhile is found on the next lookup after that.
    body = _index(1)
    fake.add_manifest(body, OCI_MANIFEST)
    referrers[MANIFEST] = _referrers(body)
    found, lookups = _lookups_over_time(fake, None, [ABSENT_INDEX_SECONDS + 1])
    assert found == [ZTOC, ZTOC] and lookups == 1  # a found index is kept


def test_an_index_that_does_not_hash_to_its_digest_is_refused() -> None:
    fake = FakeRegistry()
    digest = digest_of(_index(2))
    fake.manifests[digest] = (_index(2).replace(b"{", b"{ ", 1), OCI_MANIFEST)
    assert _lookup(fake, digest)[0] == [None]


# -- opening a layer through its zTOC -------------------------------------------------------


def _gzip_layer() -> tuple[bytes, bytes]:
    import gzip  # noqa: PLC0415
    import io  # noqa: PLC0415

    from fusefs.formats.ztoc import build_ztoc  # noqa: PLC0415
    from tests.support.oci_image import TarBuilder  # noqa: PLC0415

    blob = gzip.compress(TarBuilder().file("hello", b"hello\n" * 1000).tar(), mtime=0)
    return blob, build_ztoc(io.BytesIO(blob), span_size=4096).data


def _open(fake: FakeRegistry, layer: str, ztoc: ZtocDescriptor) -> object:
    from snapshotter.remote.open_layer import open_ztoc_layer  # noqa: PLC0415

    async def main() -> object:
        async with make_client(fake) as client:
            return (await open_ztoc_layer(client, REF, layer, ztoc)).index

    return trio.run(main)


def test_a_ztoc_is_opened_by_the_digest_its_index_gives() -> None:
    from fusefs.formats.ztoc import ZtocLayer  # noqa: PLC0415

    blob, data = _gzip_layer()
    fake = FakeRegistry()
    layer, ztoc_digest = fake.add_blob(blob), fake.add_blob(data)
    index = _open(fake, layer, ZtocDescriptor(ztoc_digest, len(data), layer, "gzip"))
    assert isinstance(index, ZtocLayer) and index.toc_trusted
    assert index.toc_digest == ztoc_digest


def test_a_ztoc_whose_bytes_do_not_match_its_digest_is_refused() -> None:
    from registry import DigestMismatchError  # noqa: PLC0415

    blob, data = _gzip_layer()
    fake = FakeRegistry()
    layer, ztoc_digest = fake.add_blob(blob), digest_of(data)
    fake.blobs[ztoc_digest] = data[:-1] + bytes([data[-1] ^ 1])  # the registry serves others
    with pytest.raises(DigestMismatchError):
        _open(fake, layer, ZtocDescriptor(ztoc_digest, len(data), layer, "gzip"))


def test_a_ztoc_without_span_digests_is_not_served() -> None:
    from fusefs import LayerFormatError  # noqa: PLC0415
    from snapshotter.remote.open_layer import index_ztoc_layer  # noqa: PLC0415
    from tests.fusefs.test_ztoc_hostile import BLOB, _ztoc  # noqa: PLC0415
    from tests.integration.fuse_support import FakeBlob  # noqa: PLC0415

    with_digests, without = _ztoc(), _ztoc(digests=[])

    async def main(data: bytes) -> object:
        return (await index_ztoc_layer(FakeBlob(BLOB), data, digest_of(data))).index

    assert trio.run(main, with_digests) is not None
    with pytest.raises(LayerFormatError, match="no span digests"):
        trio.run(main, without)
