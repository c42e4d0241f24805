"""The documents around a SOCI index, from registry bytes that are odd or hostile."""

from __future__ import annotations

import json

import pytest

from registry import Descriptor, Platform
from snapshotter import soci_index as si
from snapshotter.convert.soci_documents import (
    IndexDocumentError,
    config_platform,
    plan_layers,
    referrers_tag_index,
    soci_enabled_index,
    soci_enabled_manifest,
)

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
INDEX = si.build(si.SociIndex(1, {D1: si.ZtocDescriptor(D2, 5, D1, GZIP)},
                              si.Subject(si.OCI_MANIFEST, D3, 10), build_tool="lazysnap"))  # fmt: skip
INDEX_DIGEST = "sha256:" + "4" * 64


def test_plan_indexes_big_gzip_layers_only() -> None:
    layers = [Descriptor(GZIP, D1, 100), Descriptor(GZIP, D2, 99),
              Descriptor("application/vnd.oci.image.layer.v1.tar+zstd", D3, 1000)]  # fmt: skip
    plans = plan_layers(layers, 100)
    assert [p.indexed for p in plans] == [True, False, False]
    assert "zstd" in (plans[2].skip_reason or "")


@pytest.mark.parametrize(
    "body", [b"[]", b"{", b'{"config": 1}', b'{"config": {}, "annotations": []}']
)
def test_a_manifest_that_cannot_carry_the_annotation_is_refused(body: bytes) -> None:
    with pytest.raises(IndexDocumentError):
        soci_enabled_manifest(body, INDEX_DIGEST)


def test_the_annotation_replaces_an_older_one_and_keeps_the_rest() -> None:
    body = json.dumps({"schemaVersion": 2, "config": {"mediaType": "x", "digest": D1, "size": 1},
                       "layers": [{"mediaType": GZIP, "digest": D2, "size": 3, "urls": ["u"]}],
                       "annotations": {si.IMAGE_INDEX_DIGEST: D3, "a": "b"}}).encode()  # fmt: skip
    doc = json.loads(soci_enabled_manifest(body, INDEX_DIGEST))
    assert doc["annotations"] == {si.IMAGE_INDEX_DIGEST: INDEX_DIGEST, "a": "b"}
    assert doc["layers"] == [{"mediaType": GZIP, "digest": D2, "size": 3, "urls": ["u"]}]


def test_an_index_that_does_not_list_the_manifest_is_refused() -> None:
    top = json.dumps({"schemaVersion": 2, "manifests": [{"digest": D2}]}).encode()
    with pytest.raises(IndexDocumentError, match="does not list"):
        soci_enabled_index(top, D1, b"{}", D3, INDEX, INDEX_DIGEST, Platform("linux", "amd64"))
    with pytest.raises(IndexDocumentError):
        soci_enabled_index(b'{"manifests": [1]}', D1, b"{}", D3, INDEX, INDEX_DIGEST,
                           Platform("linux", "amd64"))  # fmt: skip


def test_referrers_tag_index_drops_garbage_entries_and_refuses_garbage_documents() -> None:
    existing = json.dumps({"schemaVersion": 2, "manifests": [7, {"digest": D3}]}).encode()
    doc = json.loads(referrers_tag_index(existing, INDEX, INDEX_DIGEST))
    assert [e["digest"] for e in doc["manifests"]] == [D3, INDEX_DIGEST]
    for bad in (b"[]", b'{"manifests": {}}', b"\xff"):
        with pytest.raises(IndexDocumentError):
            referrers_tag_index(bad, INDEX, INDEX_DIGEST)


def test_config_platform() -> None:
    assert config_platform(b'{"os": "linux", "architecture": "arm", "variant": "v7"}') == (
        Platform("linux", "arm", "v7")
    )
    with pytest.raises(IndexDocumentError):
        config_platform(b'{"os": "linux"}')
