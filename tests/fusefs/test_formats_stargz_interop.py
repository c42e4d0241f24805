"""Interop with stargz-snapshotter's own eStargz/zstd:chunked code (Debian's `ctr-remote`,
which works on a containerd content store): it reads our blobs, we read its conversions."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fusefs.formats import (
    ESTARGZ_TOC_DIGEST,
    CompactLayerIndex,
    WriteResult,
    load_layer_index,
    write_estargz,
    write_zstd_chunked,
)
from tests.fusefs.formats_support import (
    MemoryBlob,
    build_sample_tree,
    decompress_gzip_stream,
    decompress_zstd_stream,
    gnu_tar,
    index_view,
    oci_layout,
    tar_view,
)
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd

pytestmark = [
    pytest.mark.containerd,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("ctr-remote") is None,
        reason="ctr-remote not installed (apt-get install stargz-snapshotter)",
    ),
    pytest.mark.skipif(not containerd_available(), reason="containerd is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
]


class Store:
    def __init__(self, containerd: RunningContainerd, workdir: Path) -> None:
        self.containerd = containerd
        self.workdir = workdir

    def ctr(self, *args: str, stdin: bytes | None = None) -> str:
        command = ["ctr-remote", "--address", str(self.containerd.address), "-n", "formats", *args]
        result = subprocess.run(command, input=stdin, capture_output=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr.decode()[-2000:]}"
        return result.stdout.decode()

    def export_layer(self, image: str) -> tuple[bytes, dict[str, str]]:
        out = self.workdir / f"{image.replace(':', '_')}.tar"
        self.ctr("images", "export", str(out), image)
        with tarfile.open(out) as archive:

            def blob(digest: str) -> bytes:
                member = archive.extractfile("blobs/sha256/" + digest.split(":")[1])
                assert member is not None
                return member.read()

            index_file = archive.extractfile("index.json")
            assert index_file is not None
            document = json.loads(index_file.read())
            while "manifests" in document:
                document = json.loads(blob(document["manifests"][0]["digest"]))
            (layer,) = document["layers"]
            return blob(layer["digest"]), dict(layer.get("annotations", {}))


def _tar_directory(source: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return gnu_tar(build_sample_tree(tmp_path_factory.mktemp("tree") / "root"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, layer_tar: bytes) -> Iterator[Store]:
    workdir = Path(tmp_path_factory.mktemp("sgz"))
    oci_layout(workdir / "oci", layer_tar)
    archive = workdir / "image.tar"
    _tar_directory(workdir / "oci", archive)
    with run_containerd(workdir / "c", workdir / "no-proxy.sock") as containerd:
        running = Store(containerd, workdir)
        running.ctr("images", "import", "--index-name", "src:latest", "--no-unpack", str(archive))
        yield running


def load(blob: bytes, **kwargs: Any) -> CompactLayerIndex:
    async def main() -> Any:
        return await load_layer_index(MemoryBlob(blob), **kwargs)

    index = trio.run(main)
    assert isinstance(index, CompactLayerIndex)
    return index


def _paths(tar_bytes: bytes) -> set[str]:
    return set(tar_view(tar_bytes))


@pytest.mark.parametrize(
    "options",
    [["--estargz", "--estargz-chunk-size", "65536"], ["--zstdchunked"]],
    ids=["estargz", "zstdchunked"],
)
def test_we_read_ctr_remote_conversions(store: Store, layer_tar: bytes, options: list[str]) -> None:
    target = "estargz:latest" if "--estargz" in options else "zstd:latest"
    store.ctr("images", "convert", *options, "--oci", "src:latest", target)
    blob, annotations = store.export_layer(target)
    index = load(blob, toc_digest=annotations[ESTARGZ_TOC_DIGEST], annotations=annotations)
    plain = decompress_gzip_stream(blob) if "--estargz" in options else decompress_zstd_stream(blob)
    assert index_view(index, blob) == tar_view(plain)  # every file's bytes verified per chunk
    assert _paths(plain) == _paths(layer_tar)


def _ours(layer_tar: bytes, writer: Any, **options: Any) -> tuple[bytes, WriteResult]:
    out = io.BytesIO()
    result = writer(io.BytesIO(layer_tar), out, **options)
    return out.getvalue(), result


@pytest.mark.parametrize(
    ("writer", "options", "flags"),
    [
        (write_estargz, {"chunk_size": 65536}, []),
        (write_estargz, {"chunk_size": 50_000, "min_chunk_size": 100_000}, []),
        (write_estargz, {"prioritized": ["usr/bin/tool", "etc/hostname"]}, []),
        (write_zstd_chunked, {"chunk_size": 65536, "legacy": True}, ["--zstdchunked"]),
    ],
    ids=["estargz", "estargz-packed", "estargz-prioritized", "zstd-legacy"],
)
def test_ctr_remote_reads_our_blobs(
    store: Store, layer_tar: bytes, writer: Any, options: dict[str, Any], flags: list[str]
) -> None:
    blob, result = _ours(layer_tar, writer, **options)
    # Imported as an image, not ingested bare: containerd's garbage collector removes
    # unreferenced content at any time, and did so between an ingest and the next command.
    layout = store.workdir / f"ours-{result.digest[7:19]}"
    oci_layout(layout, layer_tar, layer_blob=blob)
    _tar_directory(layout, layout.with_suffix(".tar"))
    store.ctr(
        "images", "import", "--index-name", f"ours-{result.digest[7:19]}:latest", "--no-unpack",
        str(layout.with_suffix(".tar")),
    )  # fmt: skip
    toc_digest = store.ctr("images", "get-toc-digest", *flags, result.digest).strip()
    assert toc_digest == result.toc_digest
