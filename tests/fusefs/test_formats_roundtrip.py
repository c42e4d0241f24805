"""Real trees -> tar -> our writers -> load_layer_index -> the same files, metadata and bytes."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fusefs.formats import (
    ESTARGZ_TOC_DIGEST,
    ESTARGZ_UNCOMPRESSED_SIZE,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    LayerFormat,
    LayerFormatError,
    WriteResult,
    load_layer_index,
    loader,
    write_estargz,
    write_zstd_chunked,
)
from fusefs.index import Codec, EntryKind, LayerIndex
from tests.fusefs.formats_support import (
    MemoryBlob,
    build_sample_tree,
    copy_stdlib_slice,
    decompress_gzip_stream,
    decompress_zstd_stream,
    gnu_tar,
    index_view,
    read_file,
    sha,
    tar_view,
    walk,
)

Writer = Callable[..., WriteResult]

CONFIGS: dict[str, tuple[Writer, dict[str, Any]]] = {
    "estargz-default": (write_estargz, {}),
    "estargz-64k": (write_estargz, {"chunk_size": 64 * 1024}),
    "estargz-packed": (write_estargz, {"chunk_size": 50_000, "min_chunk_size": 100_000}),
    "zstd-default": (write_zstd_chunked, {}),
    "zstd-64k": (write_zstd_chunked, {"chunk_size": 64 * 1024}),
    "zstd-legacy-40k": (write_zstd_chunked, {"chunk_size": 40_000, "legacy": True}),
}


@pytest.fixture(scope="module")
def sample_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = build_sample_tree(tmp_path_factory.mktemp("tree") / "root")
    copy_stdlib_slice(root / "usr" / "lib" / "python3.11")
    return gnu_tar(root)


def convert(tar_bytes: bytes, name: str, **extra: Any) -> tuple[bytes, WriteResult]:
    writer, options = CONFIGS[name]
    out = io.BytesIO()
    result = writer(io.BytesIO(tar_bytes), out, **options, **extra)
    return out.getvalue(), result


def load(blob: bytes, **kwargs: Any) -> tuple[LayerIndex, MemoryBlob]:
    reader = MemoryBlob(blob)

    async def main() -> LayerIndex:
        return await load_layer_index(reader, **kwargs)

    return trio.run(main), reader


def decompress(blob: bytes, result: WriteResult) -> bytes:
    if result.format is LayerFormat.ESTARGZ:
        return decompress_gzip_stream(blob)
    return decompress_zstd_stream(blob)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_round_trip_matches_tar(sample_tar: bytes, config: str) -> None:
    blob, result = convert(sample_tar, config)
    index, reader = load(blob, toc_digest=result.toc_digest)
    assert index.codec is (Codec.GZIP if result.format is LayerFormat.ESTARGZ else Codec.ZSTD)
    assert index.toc_digest == result.toc_digest
    assert index_view(index, blob) == tar_view(sample_tar)
    assert len(reader.reads) == 1  # footer and TOC from one tail read


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_toc_is_trusted_only_when_a_digest_from_outside_the_blob_matched(
    sample_tar: bytes, config: str
) -> None:
    blob, result = convert(sample_tar, config)
    by_digest, _ = load(blob, toc_digest=result.toc_digest)
    by_annotations, _ = load(blob, annotations=result.annotations)
    from_blob_alone, _ = load(blob)
    assert by_digest.toc_trusted and by_annotations.toc_trusted
    assert not from_blob_alone.toc_trusted


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_blob_identity_and_decompressed_tar(sample_tar: bytes, config: str) -> None:
    blob, result = convert(sample_tar, config)
    assert result.digest == sha(blob)
    assert result.size == len(blob)
    plain = decompress(blob, result)
    if result.format is LayerFormat.ESTARGZ:  # the gzip tool agrees with zlib
        gunzipped = subprocess.run(["gzip", "-dc"], input=blob, check=True, capture_output=True)
        assert gunzipped.stdout == plain
    assert result.diff_id == sha(plain)
    assert result.uncompressed_size == len(plain)
    assert result.annotations[ESTARGZ_TOC_DIGEST] == result.toc_digest
    assert result.annotations[ESTARGZ_UNCOMPRESSED_SIZE] == str(len(plain))
    # A non-lazy runtime applying the decompressed tar sees the input's members.
    assert tar_view(plain) == tar_view(sample_tar)
    with tarfile.open(fileobj=io.BytesIO(plain)) as archive:
        names = [m.name for m in archive]
    with tarfile.open(fileobj=io.BytesIO(sample_tar)) as archive:
        original = [m.name for m in archive]
    if result.format is LayerFormat.ESTARGZ:
        assert names == [".no.prefetch.landmark", *original, "stargz.index.json"]
    else:
        assert names == original


def test_zstd_chunked_decompresses_to_the_exact_input(sample_tar: bytes) -> None:
    blob, result = convert(sample_tar, "zstd-64k")
    assert decompress_zstd_stream(blob) == sample_tar
    assert result.diff_id == sha(sample_tar)


def test_gzip_and_zstd_input_are_accepted(sample_tar: bytes, tmp_path: Path) -> None:
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as archive:
        archive.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    blob, _ = convert(gz.getvalue(), "estargz-default")
    index, _ = load(blob)
    assert index.lookup(0, b"x") is not None
    plain = tmp_path / "layer.tar"
    plain.write_bytes(sample_tar)
    subprocess.run(["zstd", "-q", "-f", str(plain)], check=True)
    blob, result = convert((tmp_path / "layer.tar.zst").read_bytes(), "zstd-default")
    assert result.diff_id == sha(sample_tar)


def test_non_seekable_input_is_spooled(sample_tar: bytes) -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe_in:
        writer_thread = threading.Thread(target=_feed, args=(write_end, sample_tar))
        writer_thread.start()
        out = io.BytesIO()
        result = write_estargz(pipe_in, out)
        writer_thread.join()
    index, _ = load(out.getvalue(), toc_digest=result.toc_digest)
    assert index_view(index, out.getvalue()) == tar_view(sample_tar)


def _feed(fd: int, data: bytes) -> None:
    with open(fd, "wb") as pipe_out:
        pipe_out.write(data)


def test_hardlinks_share_one_entry_and_count_names(sample_tar: bytes) -> None:
    blob, _ = convert(sample_tar, "estargz-default")
    index, _ = load(blob)
    usr_bin = index.lookup(index.lookup(0, b"usr") or 0, b"bin")
    assert usr_bin is not None
    tool = index.lookup(usr_bin, b"tool")
    hard = index.lookup(usr_bin, b"tool-hard")
    assert tool is not None and tool == hard
    assert index.attr(tool).nlink == 2
    assert index.attr(tool).mode & 0o7777 == 0o4755
    etc = index.lookup(0, b"etc")
    assert etc is not None
    hostname = index.lookup(etc, b"hostname")
    assert hostname == index.lookup(0, b"hostname-hard")
    assert hostname is not None and index.path(hostname) == "etc/hostname"


def test_directory_nlink_and_parents(sample_tar: bytes) -> None:
    blob, _ = convert(sample_tar, "zstd-default")
    index, _ = load(blob)
    for path, entry in walk(index):
        attr = index.attr(entry)
        parent_path, _, name = path.rpartition("/")
        if attr.kind == EntryKind.DIR:
            subdirs = sum(
                1 for _, child in index.children(entry) if index.attr(child).kind == EntryKind.DIR
            )
            assert attr.nlink == 2 + subdirs
            assert index.path(entry) == path
        if index.path(entry) == path:  # the entry's first name (hardlinks have more)
            parent = index.parent(entry)
            assert index.path(parent) == parent_path
            assert index.lookup(parent, name.encode()) == entry
    assert index.parent(0) == 0
    assert index.path(0) == ""


def test_prioritized_files_come_first_then_landmark(sample_tar: bytes) -> None:
    wanted = ["usr/bin/tool", "big.bin", "not/in/layer"]
    for config in ("estargz-64k", "zstd-64k"):
        blob, result = convert(sample_tar, config, prioritized=wanted)
        index, _ = load(blob, toc_digest=result.toc_digest)
        assert index.prefetch_end is not None
        order = list(index.file_entries())
        tool = index.lookup(index.lookup(index.lookup(0, b"usr") or 0, b"bin") or 0, b"tool")
        big = index.lookup(0, b"big.bin")
        assert order[:2] == [tool, big]
        for entry in order[:2]:
            assert all(c.blob_end <= index.prefetch_end for c in index.chunks(entry))
        for entry in order[2:]:
            assert all(c.blob_offset >= index.prefetch_end for c in index.chunks(entry))
        assert index_view(index, blob) == tar_view(sample_tar)
        # The landmark itself is not part of the tree.
        assert index.lookup(0, b".prefetch.landmark") is None
        with tarfile.open(fileobj=io.BytesIO(decompress(blob, result))) as archive:
            names = [m.name for m in archive]
        assert names.index(".prefetch.landmark") > names.index("./usr/bin/tool")


def test_file_entries_are_in_blob_order(sample_tar: bytes) -> None:
    blob, _ = convert(sample_tar, "estargz-64k")
    index, _ = load(blob)
    firsts = [index.chunks(e)[0].blob_offset for e in index.file_entries()]
    assert firsts == sorted(firsts)
    regular = {
        e for _, e in walk(index) if index.attr(e).kind == EntryKind.REG and index.attr(e).size
    }
    assert set(index.file_entries()) == regular


def test_chunk_sizes_follow_the_writer(sample_tar: bytes) -> None:
    blob, _ = convert(sample_tar, "estargz-64k")
    index, _ = load(blob)
    big = index.lookup(0, b"big.bin")
    assert big is not None
    chunks = index.chunks(big)
    assert [c.size for c in chunks] == [65536] * 4 + [300_000 - 4 * 65536]
    assert len({c.blob_offset for c in chunks}) == 5
    assert read_file(index, blob, big) == _tar_content(sample_tar, "./big.bin")


def test_zstd_zero_chunks_need_no_blob_bytes(sample_tar: bytes) -> None:
    blob, _ = convert(sample_tar, "zstd-64k")
    index, _ = load(blob)
    zeros = index.lookup(0, b"zeros.bin")
    assert zeros is not None
    chunks = index.chunks(zeros)
    assert chunks and all(c.zeros and c.blob_offset == c.blob_end for c in chunks)
    mixed = index.lookup(0, b"mixed.bin")
    assert mixed is not None
    assert [c.zeros for c in index.chunks(mixed)] == [False, True, False]
    assert read_file(index, blob, mixed) == _tar_content(sample_tar, "./mixed.bin")


def test_zstd_annotations_skip_the_footer_read(sample_tar: bytes) -> None:
    blob, result = convert(sample_tar, "zstd-default")
    index, reader = load(blob, annotations=result.annotations)
    offset, length, _, _ = result.annotations[ZSTD_MANIFEST_POSITION].split(":")
    assert reader.reads == [(int(offset), int(length))]
    assert index.toc_digest == result.toc_digest
    assert result.annotations[ZSTD_MANIFEST_CHECKSUM] == sha(
        blob[int(offset) : int(offset) + int(length)]
    )


def test_legacy_zstd_annotations_are_read(sample_tar: bytes) -> None:
    blob, result = convert(sample_tar, "zstd-legacy-40k")
    index, reader = load(blob, annotations=result.annotations)
    assert len(reader.reads) == 1
    assert index_view(index, blob) == tar_view(sample_tar)


def test_toc_beyond_the_tail_read_takes_a_second_read(
    sample_tar: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "TAIL_READ_SIZE", 4096)
    blob, result = convert(sample_tar, "estargz-default")
    index, reader = load(blob, toc_digest=result.toc_digest)
    assert len(reader.reads) == 2
    assert reader.reads[1] == (result.toc_offset, result.toc_length)
    assert index_view(index, blob) == tar_view(sample_tar)


def test_tiny_blob_smaller_than_the_tail_read() -> None:
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w"):
        pass
    blob, _ = convert(empty.getvalue(), "zstd-default")
    index, reader = load(blob)
    assert reader.reads == [(0, len(blob))]
    assert index.entry_count == 1
    assert index.children(0) == []


def _tar_content(tar_bytes: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        extracted = archive.extractfile(name)
        assert extracted is not None
        return extracted.read()


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_extension_headers_survive(tar_format: int) -> None:
    plain = io.BytesIO()
    headers = {"comment": "a global header"} if tar_format == tarfile.PAX_FORMAT else {}
    with tarfile.open(fileobj=plain, mode="w", format=tar_format, pax_headers=headers) as archive:
        info = tarfile.TarInfo("long/" + "n" * 200)
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "t" * 300
        archive.addfile(info)
    layer = plain.getvalue()
    out = io.BytesIO()
    result = write_zstd_chunked(io.BytesIO(layer), out)
    assert decompress_zstd_stream(out.getvalue()) == layer
    index, _ = load(out.getvalue(), toc_digest=result.toc_digest)
    assert index_view(index, out.getvalue()) == tar_view(layer)
    blob, result = convert(layer, "estargz-default")
    index, _ = load(blob, toc_digest=result.toc_digest)
    assert index_view(index, blob) == tar_view(layer)


def test_prioritized_hardlink_brings_its_target(sample_tar: bytes) -> None:
    blob, result = convert(sample_tar, "estargz-64k", prioritized=["hostname-hard", "tmp"])
    with tarfile.open(fileobj=io.BytesIO(decompress(blob, result))) as archive:
        names = [m.name for m in archive]
    assert names[:4] == ["./etc", "./etc/hostname", "./hostname-hard", "./tmp"]
    assert names[4] == ".prefetch.landmark"
    index, _ = load(blob, toc_digest=result.toc_digest)
    assert index_view(index, blob) == tar_view(sample_tar)


@pytest.mark.parametrize("config", ["estargz-default", "zstd-default", "zstd-legacy-40k"])
def test_names_that_are_not_utf8(tmp_path: Path, config: str) -> None:
    root = os.fsencode(tmp_path / "tree")
    os.mkdir(root)
    with open(os.path.join(root, b"caf\xe9"), "wb") as latin1:
        latin1.write(b"latin-1 name\n")
    os.symlink(b"caf\xe9", os.path.join(root, b"link\xff"))
    layer = gnu_tar(Path(os.fsdecode(root)))
    blob, result = convert(layer, config)
    index, _ = load(blob, toc_digest=result.toc_digest)
    assert index.lookup(0, b"caf\xe9") is not None
    link = index.lookup(0, b"link\xff")
    assert link is not None and index.readlink(link) == b"caf\xe9"
    assert index_view(index, blob) == tar_view(layer)


def test_large_tocs_are_parsed_off_the_event_loop(
    sample_tar: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "INLINE_PARSE_LIMIT", 0)
    blob, result = convert(sample_tar, "zstd-default")
    index, _ = load(blob, toc_digest=result.toc_digest)
    assert index_view(index, blob) == tar_view(sample_tar)
    with pytest.raises(LayerFormatError, match="mismatch"):  # errors cross the thread intact
        load(blob, toc_digest=sha(b"other"))
