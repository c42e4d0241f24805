"""The SOCI index manifest model: build and parse for v1 and v2, soci's own example, bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest

from snapshotter import soci_index as si

LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64
ZTOC_A = "sha256:" + "1" * 64
ZTOC_B = "sha256:" + "2" * 64
IMAGE = "sha256:" + "c" * 64
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# soci-snapshotter's docs/index.md, "Example Serialized SOCI Index" (a v1 index for rabbitmq).
SOCI_EXAMPLE = """{
    "annotations": {"com.amazon.soci.build-tool-identifier": "AWS SOCI CLI v0.1"},
    "config": {
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "mediaType": "application/vnd.amazon.soci.index.v1+json",
        "size": 2
    },
    "layers": [
        {"annotations": {
            "com.amazon.soci.image-layer-digest": "sha256:aece8493d3972efa43bfd4ee3cdba659c0f787f8f59c82fb3e48c87cbb22a12e",
            "com.amazon.soci.image-layer-mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
         "digest": "sha256:cb011209b93fde5a7a698302ca2e2dd4928278da32a31995c5df6d16cb27c638",
         "mediaType": "application/octet-stream", "size": 1229704},
        {"annotations": {
            "com.amazon.soci.image-layer-digest": "sha256:e8b79c92d68de7b64f81149d112547255d8edecba2f64054a533954ee3c106fe",
            "com.amazon.soci.image-layer-mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
         "digest": "sha256:7ae9f4713a78a4895a7a522117c552a519d8289eecc446820b1b528cf9257b82",
         "mediaType": "application/octet-stream", "size": 841192},
        {"annotations": {
            "com.amazon.soci.image-layer-digest": "sha256:bb157f88c818b56b154696493271c0d7a2704ed253fc2111d0a96fa89bf44984",
            "com.amazon.soci.image-layer-mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
         "digest": "sha256:715ee958c9cff9bca859e940cb05a3937bd2a6d2570fec910602df095339b067",
         "mediaType": "application/octet-stream", "size": 1086672}
    ],
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "schemaVersion": 2,
    "subject": {
        "digest": "sha256:ab5a62720aa71c964aae400825284ca3e8229934928394e68a06e395a225faae",
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "size": 2752
    }
}"""


def _ztoc(layer: str, ztoc: str, size: int = 1000) -> si.ZtocDescriptor:
    return si.ZtocDescriptor(ztoc, size, layer, GZIP, span_size=4 << 20)


def _v2() -> si.SociIndex:
    ztocs = {LAYER_A: _ztoc(LAYER_A, ZTOC_A), LAYER_B: _ztoc(LAYER_B, ZTOC_B, 7)}
    return si.SociIndex(2, ztocs, build_tool="lazysnap")


def _v1() -> si.SociIndex:
    subject = si.Subject(si.OCI_MANIFEST, IMAGE, 1234)
    return si.SociIndex(1, {LAYER_A: _ztoc(LAYER_A, ZTOC_A)}, subject, build_tool="lazysnap")


def test_soci_example_parses_and_round_trips() -> None:
    index = si.parse(SOCI_EXAMPLE.encode())
    assert index.version == 1
    assert index.subject == si.Subject(
        si.OCI_MANIFEST,
        "sha256:ab5a62720aa71c964aae400825284ca3e8229934928394e68a06e395a225faae",
        2752,
    )
    assert index.build_tool == "AWS SOCI CLI v0.1"
    ztoc = index.ztoc_for("sha256:bb157f88c818b56b154696493271c0d7a2704ed253fc2111d0a96fa89bf44984")
    assert ztoc is not None
    assert (ztoc.digest, ztoc.size, ztoc.layer_media_type, ztoc.span_size) == (
        "sha256:715ee958c9cff9bca859e940cb05a3937bd2a6d2570fec910602df095339b067",
        1086672,
        GZIP,
        None,
    )
    assert len(index.ztocs) == 3
    assert json.loads(si.build(index)) == json.loads(SOCI_EXAMPLE)


@pytest.mark.parametrize("make", [_v1, _v2], ids=["v1", "v2"])
def test_build_then_parse_gives_the_same_index(make: Any) -> None:
    index = make()
    assert si.parse(si.build(index)) == index


def test_v2_document_has_soci_shape() -> None:
    doc = json.loads(si.build(_v2()))
    assert list(doc) == ["schemaVersion", "mediaType", "config", "layers", "annotations"]
    assert doc["config"] == {
        "mediaType": si.SOCI_INDEX_V2,
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2,
    }
    assert doc["layers"][1] == {
        "mediaType": "application/octet-stream",
        "digest": ZTOC_B,
        "size": 7,
        "annotations": {
            "com.amazon.soci.image-layer-digest": LAYER_B,
            "com.amazon.soci.image-layer-mediaType": GZIP,
            "com.amazon.soci.span-size": "4194304",
        },
    }
    assert doc["annotations"] == {"com.amazon.soci.build-tool-identifier": "lazysnap"}
    assert "subject" not in doc


def test_v1_document_names_its_subject() -> None:
    doc = json.loads(si.build(_v1()))
    assert doc["config"]["mediaType"] == si.SOCI_INDEX_V1
    assert doc["subject"] == {"mediaType": si.OCI_MANIFEST, "digest": IMAGE, "size": 1234}


def test_prefetch_blobs_and_unknown_annotations_survive_a_round_trip() -> None:
    doc = json.loads(si.build(_v2()))
    doc["layers"].append({"mediaType": si.PREFETCH_MEDIA_TYPE, "digest": ZTOC_B, "size": 3,
                          "annotations": {si.LAYER_DIGEST: LAYER_A}})  # fmt: skip
    doc["layers"][0]["annotations"]["x.example/kept"] = "yes"
    doc["annotations"]["x.example/index"] = "also"
    index = si.parse(json.dumps(doc).encode())
    assert len(index.other_blobs) == 1 and len(index.ztocs) == 2
    assert index.ztocs[LAYER_A].extra_annotations == {"x.example/kept": "yes"}
    assert json.loads(si.build(index)) == doc


def test_disable_xattrs_is_read_and_written() -> None:
    ztoc = si.ZtocDescriptor(ZTOC_A, 1, LAYER_A, GZIP, disable_xattrs=True)
    index = si.SociIndex(2, {LAYER_A: ztoc})
    doc = json.loads(si.build(index))
    assert doc["layers"][0]["annotations"][si.DISABLE_XATTRS] == "true"
    assert si.parse(si.build(index)).ztocs[LAYER_A].disable_xattrs


def _mutated(change: Any, make: Any = _v2) -> bytes:
    doc = json.loads(si.build(make()))
    change(doc)
    return json.dumps(doc).encode()


def _set(path: list[Any], value: Any) -> Any:
    def change(doc: Any) -> None:
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value

    return change


BAD = {
    "not json": b"{",
    "nested too deep": b"[" * 200_000,
    "not utf-8": b'{"a": "\xff"}',
    "not an object": b"[]",
    "schema version": _mutated(_set(["schemaVersion"], 1)),
    "image index media type": _mutated(_set(["mediaType"], si.OCI_INDEX)),
    "config not soci": _mutated(_set(["config", "mediaType"], si.OCI_INDEX)),
    "no config": _mutated(lambda d: d.pop("config")),
    "artifactType disagrees": _mutated(_set(["artifactType"], si.SOCI_INDEX_V1)),
    "layers not a list": _mutated(_set(["layers"], {})),
    "ztoc without layer digest": _mutated(
        lambda d: d["layers"][0]["annotations"].pop(si.LAYER_DIGEST)
    ),
    "ztoc layer digest malformed": _mutated(
        _set(["layers", 0, "annotations", si.LAYER_DIGEST], "sha256:xyz")
    ),
    "two ztocs for one layer": _mutated(
        _set(["layers", 1, "annotations", si.LAYER_DIGEST], LAYER_A)
    ),
    "negative size": _mutated(_set(["layers", 0, "size"], -1)),
    "huge ztoc": _mutated(_set(["layers", 0, "size"], si.MAX_ZTOC_BYTES + 1)),
    "boolean size": _mutated(_set(["layers", 0, "size"], True)),
    "float size": _mutated(_set(["layers", 0, "size"], 1.5)),
    "huge other blob": _mutated(
        lambda d: d["layers"].append({"mediaType": "x/y", "digest": ZTOC_A, "size": 2**60})
    ),
    "span size zero": _mutated(_set(["layers", 0, "annotations", si.SPAN_SIZE], "0")),
    "span size text": _mutated(_set(["layers", 0, "annotations", si.SPAN_SIZE], "-4")),
    "annotation not a string": _mutated(_set(["annotations", "k"], 1)),
    "blob digest uppercase": _mutated(_set(["layers", 0, "digest"], ZTOC_A.upper())),
    "v2 with subject": _mutated(
        _set(["subject"], {"mediaType": si.OCI_MANIFEST, "digest": IMAGE, "size": 1})
    ),
    "v1 without subject": _mutated(lambda d: d.pop("subject"), _v1),
    "subject size hostile": _mutated(_set(["subject", "size"], 2**62), _v1),
    "too many blobs": _mutated(lambda d: d.__setitem__("layers", d["layers"] * 2049)),
    "too large": b" " * (si.MAX_INDEX_BYTES + 1) + b"{}",
}


@pytest.mark.parametrize("content", BAD.values(), ids=BAD.keys())
def test_malformed_index_is_refused(content: bytes) -> None:
    with pytest.raises(si.SociIndexError):
        si.parse(content)


def test_the_error_is_a_value_error() -> None:
    assert issubclass(si.SociIndexError, ValueError)


def test_model_refuses_inconsistent_indexes() -> None:
    with pytest.raises(si.SociIndexError, match="subject"):
        si.SociIndex(2, {}, si.Subject(si.OCI_MANIFEST, IMAGE, 1))
    with pytest.raises(si.SociIndexError, match="subject"):
        si.SociIndex(1, {})
    with pytest.raises(si.SociIndexError, match="keyed"):
        si.SociIndex(2, {LAYER_B: _ztoc(LAYER_A, ZTOC_A)})
    with pytest.raises(si.SociIndexError, match="extra"):
        ztoc = si.ZtocDescriptor(ZTOC_A, 1, LAYER_A, GZIP, extra_annotations={si.SPAN_SIZE: "1"})
        si.SociIndex(2, {LAYER_A: ztoc})


def test_index_digest_annotation() -> None:
    assert si.index_digest_of({si.IMAGE_INDEX_DIGEST: ZTOC_A}) == ZTOC_A
    assert si.index_digest_of({}) is None
    with pytest.raises(si.SociIndexError):
        si.index_digest_of({si.IMAGE_INDEX_DIGEST: "../../etc"})
