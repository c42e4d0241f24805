"""Blobs not made by our writers: a real external producer (skopeo's zstd:chunked) and blobs
built here byte by byte from the format descriptions, with details our writers do not use
(legacy footer, chunkSize on every chunk, innerOffset packing, several frames per payload)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
import zstandard

from fusefs.formats import (
    LEGACY_ZSTD_MANIFEST_CHECKSUM,
    LEGACY_ZSTD_MANIFEST_POSITION,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    CompactLayerIndex,
    load_layer_index,
    write_zstd_chunked,
)
from fusefs.formats.crc64 import Crc64
from fusefs.formats.footer import build_zstd_footer, skippable_frame
from fusefs.index import Codec
from tests.fusefs.formats_support import (
    MemoryBlob,
    build_sample_tree,
    decompress_gzip_stream,
    decompress_zstd_stream,
    gnu_tar,
    index_view,
    legacy_estargz_footer,
    oci_layout,
    read_file,
    sha,
    tar_view,
)


def load(blob: bytes, **kwargs: Any) -> tuple[CompactLayerIndex, MemoryBlob]:
    reader = MemoryBlob(blob)

    async def main() -> Any:
        return await load_layer_index(reader, **kwargs)

    index = trio.run(main)
    assert isinstance(index, CompactLayerIndex)
    return index, reader


# --- skopeo (containers/image + containers/storage) --------------------------------------------


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_zstd_chunked_layer_reads_back(tmp_path: Path) -> None:
    tree = build_sample_tree(tmp_path / "tree")
    layer_tar = gnu_tar(tree)
    oci_layout(tmp_path / "src", layer_tar)
    subprocess.run(
        [
            "skopeo", "copy", "-q", "--dest-compress-format", "zstd:chunked",
            f"oci:{tmp_path / 'src'}:t", f"oci:{tmp_path / 'dst'}:t",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    dst = tmp_path / "dst"
    index_doc = json.loads((dst / "index.json").read_text())
    manifest_digest = index_doc["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((dst / "blobs" / "sha256" / manifest_digest).read_bytes())
    (layer,) = manifest["layers"]
    blob = (dst / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
    annotations = layer.get("annotations", {})
    assert any("zstd-chunked.manifest-position" in key for key in annotations)
    # What a non-lazy runtime applies: the same tar (this c/storage version drops the
    # record padding after the end-of-archive blocks, which later versions keep).
    plain = decompress_zstd_stream(blob)
    assert layer_tar.startswith(plain) and not layer_tar[len(plain) :].strip(b"\0")

    by_footer, _ = load(blob)
    assert index_view(by_footer, blob) == tar_view(layer_tar)
    by_annotations, reader = load(blob, annotations=annotations)
    assert len(reader.reads) == 1
    assert by_annotations.toc_digest == by_footer.toc_digest


# --- eStargz built from the specification ----------------------------------------------------


class _Members:
    """Concatenated gzip members, as an eStargz writer emits them."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.deflate: Any = None
        self.start = 0
        self.raw = 0

    def new(self) -> None:
        self.close()
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
        self.start = len(self.blob)
        self.raw = 0

    def close(self) -> None:
        if self.deflate is not None:
            self.blob += self.deflate.flush()
            self.deflate = None

    def write(self, data: bytes) -> None:
        if self.deflate is None:
            self.new()
        self.blob += self.deflate.compress(data)
        self.raw += len(data)


def _header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o640
    info.mtime = 1_600_000_000
    return info.tobuf(tarfile.USTAR_FORMAT)


def _pad(size: int) -> bytes:
    return bytes(-size % 512)


def test_hand_made_estargz_with_packing_and_legacy_footer() -> None:
    small_a, small_b = b"A" * 100, b"B" * 300
    big = os.urandom(10_000)
    out = _Members()
    toc: list[dict[str, Any]] = []
    out.write(_header("./dir/", kind=tarfile.DIRTYPE))
    toc.append({"name": "./dir/", "type": "dir", "mode": 0o755, "modtime": "2020-09-13T12:26:40Z"})
    # Two small files packed into one member: same offset, told apart by innerOffset.
    out.write(_header("./dir/a", len(small_a)))
    out.new()
    packed_offset = out.start
    for name, content in (("./dir/a", small_a), ("./dir/b", small_b)):
        if name.endswith("b"):
            out.write(_header(name, len(content)))
        entry = {
            "name": name, "type": "reg", "size": len(content), "mode": 0o640,
            "offset": packed_offset, "innerOffset": out.raw,
            "digest": sha(content), "chunkDigest": sha(content),
        }  # fmt: skip
        out.write(content + _pad(len(content)))
        toc.append(entry)
    # A chunked file whose every chunk carries chunkSize (the last one too).
    out.write(_header("./dir/big", len(big)))
    for chunk_offset in range(0, len(big), 4096):
        piece = big[chunk_offset : chunk_offset + 4096]
        out.new()
        fields = {
            "offset": out.start, "chunkSize": len(piece), "chunkDigest": sha(piece),
        }  # fmt: skip
        if chunk_offset == 0:
            toc.append({"name": "./dir/big", "type": "reg", "size": len(big), **fields})
        else:
            toc.append(
                {"name": "./dir/big", "type": "chunk", "chunkOffset": chunk_offset, **fields}
            )
        out.write(piece)
    out.write(_pad(len(big)))
    document = json.dumps({"version": 1, "entries": toc}).encode()
    out.new()
    toc_offset = out.start
    out.write(_header("stargz.index.json", len(document)) + document + _pad(len(document)))
    out.write(bytes(1024))
    out.close()
    blob = bytes(out.blob) + legacy_estargz_footer(toc_offset)

    index, reader = load(blob, toc_digest=sha(document))
    assert len(reader.reads) == 1 and index.codec is Codec.GZIP
    directory = index.lookup(0, b"dir")
    assert directory is not None
    contents = {name: read_file(index, blob, entry) for name, entry in index.children(directory)}
    assert contents == {b"a": small_a, b"b": small_b, b"big": big}
    a, b = (index.chunks(index.lookup(directory, n) or 0)[0] for n in (b"a", b"b"))
    assert (
        a.blob_offset == b.blob_offset and b.inner_offset == 512 + 512
    )  # a's padded payload, b's header
    # Still one valid gzip stream holding a valid tar.
    with tarfile.open(fileobj=io.BytesIO(decompress_gzip_stream(blob))) as archive:
        assert archive.getnames() == [
            "./dir",
            "./dir/a",
            "./dir/b",
            "./dir/big",
            "stargz.index.json",
        ]


# --- zstd:chunked v2 built from the specification ----------------------------------------------


def test_hand_made_zstd_chunked_v2() -> None:
    cctx = zstandard.ZstdCompressor(level=3)
    single = os.urandom(3000)
    holes = os.urandom(2000) + bytes(5000)
    blob = bytearray()
    toc: list[dict[str, Any]] = []
    blob += cctx.compress(_header("single", len(single)))
    start = len(blob)
    # One file's payload split over two frames: offset..endOffset spans both.
    blob += cctx.compress(single[:1000]) + cctx.compress(single[1000:])
    single_end = len(blob)
    toc.append({
        "type": "reg", "name": "single", "mode": 0o644, "size": len(single),
        "digest": sha(single), "offset": start, "endOffset": single_end,
    })  # fmt: skip
    blob += cctx.compress(_pad(len(single)) + _header("holes", len(holes)))
    first = len(blob)
    blob += cctx.compress(holes[:2000])
    second = len(blob)
    blob += cctx.compress(holes[2000:])
    toc.append({
        "type": "reg", "name": "holes", "mode": 0o644, "size": len(holes),
        "digest": sha(holes), "offset": first, "endOffset": len(blob),
        "chunkSize": 2000, "chunkDigest": sha(holes[:2000]),
    })  # fmt: skip
    toc.append({
        "type": "chunk", "name": "holes", "offset": second, "chunkOffset": 2000,
        "chunkSize": 5000, "chunkDigest": sha(bytes(5000)), "chunkType": "zeros",
    })  # fmt: skip
    blob += cctx.compress(_pad(len(holes)) + bytes(1024))
    document = json.dumps({"version": 1, "entries": toc}).encode()
    toc_frame = cctx.compress(document)
    toc_offset = len(blob) + 8
    blob += skippable_frame(toc_frame)
    tarsplit = cctx.compress(b"")
    tarsplit_offset = len(blob) + 8
    blob += skippable_frame(tarsplit)
    blob += build_zstd_footer(
        toc_offset, len(toc_frame), len(document), tarsplit_offset, len(tarsplit), 0
    )
    data = bytes(blob)

    index, _ = load(data, toc_digest=sha(toc_frame))
    assert index.codec is Codec.ZSTD
    single_id = index.lookup(0, b"single")
    holes_id = index.lookup(0, b"holes")
    assert single_id is not None and holes_id is not None
    (chunk,) = index.chunks(single_id)
    assert (chunk.blob_offset, chunk.blob_end) == (start, single_end)
    assert read_file(index, data, single_id) == single
    assert [c.zeros for c in index.chunks(holes_id)] == [False, True]
    assert read_file(index, data, holes_id) == holes
    annotations = {
        ZSTD_MANIFEST_POSITION: f"{toc_offset}:{len(toc_frame)}:{len(document)}:1",
        ZSTD_MANIFEST_CHECKSUM: sha(toc_frame),
    }
    _, reader = load(data, annotations=annotations)
    assert reader.reads == [(toc_offset, len(toc_frame))]
    with tarfile.open(fileobj=io.BytesIO(decompress_zstd_stream(data))) as archive:
        assert archive.getnames() == ["single", "holes"]


def test_legacy_annotations_select_the_legacy_schema(tmp_path: Path) -> None:
    layer = gnu_tar(build_sample_tree(tmp_path / "tree"))
    out = io.BytesIO()
    result = write_zstd_chunked(io.BytesIO(layer), out, chunk_size=30_000, legacy=True)
    assert set(result.annotations) >= {LEGACY_ZSTD_MANIFEST_CHECKSUM, LEGACY_ZSTD_MANIFEST_POSITION}
    index, reader = load(out.getvalue(), annotations=result.annotations)
    assert len(reader.reads) == 1
    assert index_view(index, out.getvalue()) == tar_view(layer)


# --- tar-split ---------------------------------------------------------------------------------


def test_crc64_matches_go_iso() -> None:
    crc = Crc64()
    crc.update(b"123456789")
    assert crc.value() == 0xB90956C775A41001  # CRC-64/GO-ISO check value
    assert crc.digest() == bytes.fromhex("b90956c775a41001")
    data = bytes(range(256)) * 41 + b"tail"
    whole = Crc64()
    whole.update(data)
    pieces = Crc64()
    for start in range(0, len(data), 13):  # unaligned pieces take the byte-at-a-time path
        pieces.update(memoryview(data)[start : start + 13])
    assert pieces.value() == whole.value()


def test_tar_split_rebuilds_the_tar(tmp_path: Path) -> None:
    layer = gnu_tar(build_sample_tree(tmp_path / "tree"))
    out = io.BytesIO()
    result = write_zstd_chunked(io.BytesIO(layer), out, chunk_size=64 * 1024)
    blob = out.getvalue()
    offset, length, raw_length = (
        int(x)
        for x in result.annotations["io.github.containers.zstd-chunked.tarsplit-position"].split(
            ":"
        )
    )
    lines = zstandard.ZstdDecompressor().decompress(
        blob[offset : offset + length], max_output_size=raw_length
    )
    assert len(lines) == raw_length
    toc_frame = blob[result.toc_offset : result.toc_offset + result.toc_length]
    toc = json.loads(zstandard.ZstdDecompressor().decompress(toc_frame, max_output_size=10**8))
    assert toc["tarSplitDigest"] == sha(blob[offset : offset + length])
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(layer)) as archive:
        for member in archive:
            if member.isreg():
                extracted = archive.extractfile(member)
                assert extracted is not None
                contents[member.name] = extracted.read()
    rebuilt = bytearray()
    for position, line in enumerate(lines.splitlines()):
        record = json.loads(line)
        assert record["position"] == position
        if record["type"] == 2:
            rebuilt += base64.b64decode(record["payload"])
            continue
        assert record["type"] == 1
        size = record.get("size", 0)
        if size:
            content = contents[record["name"]]
            crc = Crc64()
            crc.update(content)
            assert base64.b64decode(record["payload"]) == crc.digest()
            rebuilt += content
    assert bytes(rebuilt) == layer
