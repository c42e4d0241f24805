from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter import labels as L
from snapshotter.client.chain import (
    ImageConfigError,
    chain_ids,
    diff_ids_from_config,
    image_layers_value,
    index_gc_labels,
    layer_labels,
    manifest_gc_labels,
)


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = digest(1), digest(2), digest(3)
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []


@given(st.lists(st.integers(0, 1000), max_size=8), st.lists(st.integers(0, 1000), max_size=8))
def test_chain_ids_of_a_prefix_are_a_prefix(head: list[int], tail: list[int]) -> None:
    base = [digest(n) for n in head]
    full = chain_ids(base + [digest(n) for n in tail])
    assert full[: len(base)] == chain_ids(base)
    assert len(full) == len(head) + len(tail)


def test_diff_ids_from_config() -> None:
    config = {"rootfs": {"type": "layers", "diff_ids": [digest(1), digest(2)]}}
    assert diff_ids_from_config(json.dumps(config).encode()) == (digest(1), digest(2))


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b"{}", b'{"rootfs": {"diff_ids": [1]}}',
     b'{"rootfs": {"type": "other", "diff_ids": []}}'],
)
def test_bad_configs_are_refused(body: bytes) -> None:
    with pytest.raises(ImageConfigError):
        diff_ids_from_config(body)


def test_image_layers_fit_the_label_limit_dropping_whole_digests() -> None:
    digests = [digest(n) for n in range(100)]
    value = image_layers_value(digests)
    kept = value.split(",")
    # 71-byte digests plus commas: 56 fit next to the 39-byte key, as containerd documents.
    assert len(kept) == 56 and kept == digests[:56]
    assert len(L.CRI_IMAGE_LAYERS) + len(value) <= L.MAX_LABEL_BYTES
    assert image_layers_value(digests[:3]) == ",".join(digests[:3])


def test_layer_labels_are_crIs_plus_the_ref_and_inherited_annotations() -> None:
    digests = [digest(n) for n in range(3)]
    labels = layer_labels(
        image_ref="example.com/app:1",
        manifest_digest=digest(9),
        layer_digests=digests,
        index=1,
        chain_id=digest(7),
        annotations={L.ESTARGZ_TOC_DIGEST: digest(8), "org.opencontainers.x": "dropped"},
    )
    assert labels == {
        L.CRI_IMAGE_REF: "example.com/app:1",
        L.CRI_LAYER_DIGEST: digests[1],
        L.CRI_MANIFEST_DIGEST: digest(9),
        L.CRI_IMAGE_LAYERS: f"{digests[1]},{digests[2]}",
        L.SNAPSHOT_REF: digest(7),
        L.ESTARGZ_TOC_DIGEST: digest(8),
    }


def test_gc_labels() -> None:
    assert manifest_gc_labels(digest(0), [digest(1), digest(2)]) == {
        "containerd.io/gc.ref.content.config": digest(0),
        "containerd.io/gc.ref.content.l.0": digest(1),
        "containerd.io/gc.ref.content.l.1": digest(2),
    }
    assert index_gc_labels([digest(3)]) == {"containerd.io/gc.ref.content.m.0": digest(3)}


def test_layer_labels_forward_what_a_lazy_reader_needs_and_cri_would_drop() -> None:
    from snapshotter.client.chain import layer_labels  # noqa: PLC0415
    from snapshotter.labels import ANNOTATION_LABEL_PREFIX, MEDIA_TYPE_LABEL  # noqa: PLC0415
    from snapshotter.remote.decision import decide  # noqa: PLC0415

    digest = "sha256:" + "a" * 64
    labels = layer_labels(
        image_ref="reg.example/app:1",
        manifest_digest="sha256:" + "b" * 64,
        layer_digests=[digest],
        index=0,
        chain_id="sha256:" + "c" * 64,
        annotations={
            "io.github.containers.zstd-chunked.manifest-checksum": "sha256:" + "d" * 64,
            "io.github.containers.zstd-chunked.manifest-position": "10:20:30:1",
            "org.opencontainers.image.title": "not forwarded",
        },
        media_type="application/vnd.oci.image.layer.v1.tar+zstd",
    )
    assert labels[ANNOTATION_LABEL_PREFIX + "io.github.containers.zstd-chunked.manifest-position"] \
        == "10:20:30:1"
    assert labels[MEDIA_TYPE_LABEL] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert not any("image.title" in key for key in labels)
    decision = decide(labels)  # the daemon decides from these labels alone
    assert decision is not None and decision.format == "zstd:chunked"
    assert not decision.needs_manifest
