"""``lazysnap convert`` against the real docker-registry: the busybox test image converted to
eStargz and zstd:chunked is lazily pullable layer by layer, its blobs hold the source's files,
and bad input fails with one line and leaves no destination tag."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from typing import Any

import pytest
import trio

from registry import RegistryClient, parse_reference
from tests.integration.conftest import PushedImage
from tests.snapshotter.convert.test_image import decompressed, files_of
from tests.support.docker_registry import RunningRegistry
from tests.support.ports import free_port

pytestmark = [pytest.mark.registry, pytest.mark.slow]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _lazysnap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _get(registry: RunningRegistry, path: str) -> bytes:
    request = urllib.request.Request(
        f"{registry.url}/v2/{path}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        body: bytes = answer.read()
    return body


def _has_manifest(registry: RunningRegistry, repository: str, tag: str) -> bool:
    try:
        _get(registry, f"{repository}/manifests/{tag}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return False
    return True


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazysnap convert: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_busybox_converts_to_a_lazily_pullable_image(
    fmt: str, docker_registry: RunningRegistry, busybox_image: PushedImage
) -> None:
    tag = "conv-" + fmt.replace(":", "-")
    destination = f"{docker_registry.host}/test/busybox:{tag}"
    result = _lazysnap(
        "convert", busybox_image.reference, destination, "--format", fmt,
        "--prioritize", "/etc/hello", "--chunk-size", "65536",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["layer", "1/2"], ["layer", "2/2"]]
    assert all(f"-> {fmt}" in line for line in lines[:2]), lines
    digest = lines[-1].split()[-1]
    assert lines[-1] == f"pushed {destination} digest {digest}"

    inspected = _lazysnap("inspect", destination, "--json")
    assert inspected.returncode == 0, inspected.stderr
    report: dict[str, Any] = json.loads(inspected.stdout)
    assert report["digest"] == digest
    assert [(layer["lazy"], layer["format"]) for layer in report["layers"]] == [(True, fmt)] * 2

    manifest = json.loads(_get(docker_registry, f"test/busybox/manifests/{digest}"))
    assert manifest["mediaType"] == OCI_MANIFEST
    for descriptor, source in zip(manifest["layers"], busybox_image.layers, strict=True):
        blob = _get(docker_registry, f"test/busybox/blobs/{descriptor['digest']}")
        assert len(blob) == descriptor["size"]
        assert files_of(decompressed(blob)) == files_of(gzip.decompress(source.blob))


def test_unknown_source_and_a_registry_that_is_down_fail_in_one_line(
    docker_registry: RunningRegistry, busybox_image: PushedImage
) -> None:
    missing = f"{docker_registry.host}/test/no-such-image:1"
    destination = f"{docker_registry.host}/test/converted:never"
    _one_line_error(_lazysnap("convert", missing, destination), missing, "not found")
    down = f"127.0.0.1:{free_port()}"
    _one_line_error(
        _lazysnap("convert", f"{down}/test/busybox:latest", f"{down}/test/x:1"), "TransportError"
    )
    _one_line_error(
        _lazysnap("convert", busybox_image.reference, destination, "--platform", "linux"),
        "invalid platform",
    )
    assert not _has_manifest(docker_registry, "test/converted", "never")


async def _push_image_with_layer_type(reference: str, layer_media_type: str) -> None:
    ref = parse_reference(reference)
    async with RegistryClient() as client:
        layer = await client.push_blob(ref, b"BZh91AY&SY not a tar")
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
        }).encode()
        config_descriptor = await client.push_blob(ref, config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_descriptor.digest, "size": config_descriptor.size},
            "layers": [{"mediaType": layer_media_type, "digest": layer.digest,
                        "size": layer.size}],
        }
        await client.push_manifest(ref, json.dumps(manifest).encode(), OCI_MANIFEST)


def test_an_unsupported_layer_media_type_fails_and_pushes_no_tag(
    docker_registry: RunningRegistry,
) -> None:
    bzip2 = "application/vnd.oci.image.layer.v1.tar+bzip2"
    source = f"{docker_registry.host}/test/bzip2:1"
    trio.run(_push_image_with_layer_type, source, bzip2)
    result = _lazysnap("convert", source, f"{docker_registry.host}/test/bzip2:lazy")
    _one_line_error(result, "unsupported layer media type", bzip2)
    assert not _has_manifest(docker_registry, "test/bzip2", "lazy")


@pytest.mark.root
@pytest.mark.fuse
def test_optimize_puts_the_files_a_command_read_first(
    docker_registry: RunningRegistry, busybox_image: PushedImage
) -> None:
    if shutil.which("runc") is None:
        if os.environ.get("CI"):
            pytest.fail("required in CI: runc")
        pytest.skip("runc is not installed")
    destination = f"{docker_registry.host}/test/busybox:optimized"
    result = _lazysnap(
        "convert", busybox_image.reference, destination, "--optimize", "cat /etc/hello"
    )
    assert result.returncode == 0, result.stderr
    assert "the command exited 0" in result.stdout, result.stdout
    digest = result.stdout.splitlines()[-1].split()[-1]
    manifest = json.loads(_get(docker_registry, f"test/busybox/manifests/{digest}"))
    names = [
        tarfile.open(
            fileobj=io.BytesIO(
                decompressed(_get(docker_registry, f"test/busybox/blobs/{layer['digest']}"))
            )
        ).getnames()
        for layer in manifest["layers"]
    ]
    # `cat` is busybox; runc looked up root in /etc/passwd; then the file itself.
    landmark = ".prefetch.landmark"
    assert "bin/busybox" in names[0][: names[0].index(landmark)]
    assert names[1][: names[1].index(landmark)] == ["etc", "etc/hello"]
    # The untagged first pass is gone from the tag's point of view; nothing is left mounted.
    with open("/proc/mounts") as mounts:
        assert "lazysnap-optimize-" not in mounts.read()
