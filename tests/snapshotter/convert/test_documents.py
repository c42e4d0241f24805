"""The pure half of ``lazysnap convert``: media types, annotations, config and manifest."""

from __future__ import annotations

import json

import pytest

from snapshotter.convert.documents import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    ConvertError,
    LayerOut,
    build_manifest,
    check_convertible,
    converted_annotations,
    parse_target_format,
    rewrite_config,
    source_diff_ids,
)
from snapshotter.convert.image import normalize_prioritized

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_target_formats() -> None:
    assert parse_target_format("estargz") == "estargz"
    assert parse_target_format("zstd:chunked") == "zstd:chunked"
    with pytest.raises(ConvertError, match="unknown format 'gzip'"):
        parse_target_format("gzip")


@pytest.mark.parametrize(
    ("media_type", "oci"),
    [
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", OCI_LAYER_GZIP),
        ("application/vnd.oci.image.layer.v1.tar+gzip; foo=bar", OCI_LAYER_GZIP),
        ("application/vnd.oci.image.layer.v1.tar", OCI_LAYER_TAR),
        ("application/vnd.docker.image.rootfs.diff.tar", OCI_LAYER_TAR),
    ],
)
def test_convertible_layers_map_to_oci_media_types(media_type: str, oci: str) -> None:
    assert check_convertible(media_type, D1) == oci


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.example.helm.chart",
    ],
)
def test_other_layers_are_refused_with_their_digest(media_type: str) -> None:
    with pytest.raises(ConvertError, match=f"layer {D1}: unsupported layer media type"):
        check_convertible(media_type, D1)


def test_stale_format_annotations_are_replaced_others_kept() -> None:
    source = {
        "org.example.owner": "team-a",
        "io.github.containers.zstd-chunked.manifest-checksum": D1,
        "io.github.containers.zstd-chunked.manifest-position": "1:2:3:1",
        "containerd.io/snapshot/stargz/toc.digest": D1,
    }
    written = {"containerd.io/snapshot/stargz/toc.digest": D2}
    assert converted_annotations(source, written) == {
        "org.example.owner": "team-a",
        "containerd.io/snapshot/stargz/toc.digest": D2,
    }


def test_config_rewrite_replaces_only_the_diff_ids() -> None:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [D1, D1]},
            "history": [{"created_by": "x"}, {"created_by": "y"}],
        }
    ).encode()
    assert source_diff_ids(config) == [D1, D1]
    rewritten = json.loads(rewrite_config(config, [D2, D1]))
    assert rewritten["rootfs"] == {"type": "layers", "diff_ids": [D2, D1]}
    assert {k: v for k, v in rewritten.items() if k != "rootfs"} == {
        k: v for k, v in json.loads(config).items() if k != "rootfs"
    }
    with pytest.raises(ConvertError, match="config lists 2 layers"):
        rewrite_config(config, [D2])


@pytest.mark.parametrize(
    "config", [b"not json", b"[]", b'{"rootfs": {}}', b'{"rootfs": {"diff_ids": [1]}}']
)
def test_malformed_configs_are_convert_errors(config: bytes) -> None:
    with pytest.raises(ConvertError):
        source_diff_ids(config)


def test_manifest_is_oci_with_layer_and_manifest_annotations() -> None:
    layers = [
        LayerOut(OCI_LAYER_GZIP, D1, 10, D2, {"b": "2", "a": "1"}),
        LayerOut(OCI_LAYER_GZIP, D2, 20, D1),
    ]
    doc = json.loads(build_manifest(D1, 5, layers, {"org.opencontainers.image.title": "t"}))
    assert doc == {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": D1, "size": 5},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": D1, "size": 10,
             "annotations": {"a": "1", "b": "2"}},
            {"mediaType": OCI_LAYER_GZIP, "digest": D2, "size": 20},
        ],
        "annotations": {"org.opencontainers.image.title": "t"},
    }


def test_prioritized_paths_become_member_names() -> None:
    assert normalize_prioritized(["/etc/hello", "bin/sh", "/etc/hello/"]) == (
        "etc/hello",
        "bin/sh",
    )
    with pytest.raises(ConvertError, match="not a file path"):
        normalize_prioritized(["/"])
