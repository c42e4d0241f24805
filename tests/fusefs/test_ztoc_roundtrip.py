"""zTOC round trips: build one for a gzip layer, read it back, and read every file through
checkpoint inflation, byte-identical to the tar's contents."""

from __future__ import annotations

import gzip
import io
import random
import struct
from pathlib import Path

import pytest

from fusefs.formats import LayerFormatError
from fusefs.formats.ztoc import (
    WINDOW_SIZE,
    InflateMethod,
    ZtocBuildError,
    ZtocLayer,
    build_ztoc,
    parse_ztoc,
)
from fusefs.formats.ztoc.checkpoints import pack_checkpoints, parse_checkpoints
from fusefs.formats.ztoc.encode import ZtocFile, encode_ztoc
from fusefs.index import Codec, LayerIndex
from tests.fusefs.formats_support import build_sample_tree, gnu_tar, index_view, tar_view
from tests.fusefs.ztoc_support import lookup, read_ztoc_file, sha
from tests.support.oci_image import TarBuilder, busybox_tar, gzip_layer

SPAN = 64 * 1024


def _index(blob: bytes, span_size: int = SPAN) -> ZtocLayer:
    built = build_ztoc(io.BytesIO(blob), span_size=span_size)
    layer = parse_ztoc(built.data, blob_size=len(blob), ztoc_digest=built.digest)
    assert built.spans == len(layer.spans)
    return layer


def _reader(layer: ZtocLayer, method: InflateMethod | None = None):  # type: ignore[no-untyped-def]
    def read(index: LayerIndex, blob: bytes, entry: int) -> bytes:
        assert index is layer.index
        return read_ztoc_file(layer, blob, entry, method)

    return read


def test_sample_tree_reads_back_identical(tmp_path: Path) -> None:
    tar = gnu_tar(build_sample_tree(tmp_path / "tree"))
    blob = gzip.compress(tar, mtime=0)
    layer = _index(blob)
    assert layer.index.codec is Codec.GZIP_SPANS
    assert layer.index.toc_trusted
    assert len(layer.spans) > 3  # files cross span boundaries
    assert index_view(layer.index, blob, _reader(layer)) == tar_view(tar)


@pytest.mark.parametrize("method", [InflateMethod.PADDED, InflateMethod.PRIMED])
def test_busybox_layer_every_file_through_each_method(method: InflateMethod) -> None:
    tar = busybox_tar()
    layer_blob = gzip_layer(tar).blob
    layer = _index(layer_blob)
    bits = {p.bits for p in layer.spans.checkpoints}
    assert len(bits) > 2  # checkpoints at several bit offsets, not only byte boundaries
    assert index_view(layer.index, layer_blob, _reader(layer, method)) == tar_view(tar)


def test_concatenated_gzip_members() -> None:
    tar = busybox_tar()
    cut = len(tar) // 3
    blob = b"".join(
        gzip.compress(part, mtime=0) for part in (tar[:cut], tar[cut : 2 * cut], tar[2 * cut :])
    )
    layer = _index(blob)
    for method in (InflateMethod.PADDED, InflateMethod.PRIMED):
        assert index_view(layer.index, blob, _reader(layer, method)) == tar_view(tar)


def test_default_span_size_and_small_layer() -> None:
    tar = TarBuilder().dir("d").file("d/a", b"hello\n").symlink("d/l", "a").whiteout("d/gone").tar()
    blob = gzip_layer(tar).blob
    built = build_ztoc(io.BytesIO(blob))
    assert built.spans == 1
    layer = parse_ztoc(built.data, blob_size=len(blob))
    assert not layer.index.toc_trusted  # no digest from a manifest was given
    assert read_ztoc_file(layer, blob, lookup(layer.index, "d/a")) == b"hello\n"
    assert index_view(layer.index, blob, _reader(layer)) == tar_view(tar)


def test_stored_blocks_break_bit_shifting_but_not_the_kept_methods() -> None:
    # Random data makes gzip write stored blocks, whose contents are byte-aligned in the
    # original stream: shifting the bits misaligns them.
    rnd = random.Random(7)
    data = b"".join(rnd.randbytes(100_000) + b"text %d " % i * 5000 for i in range(20))
    tar = TarBuilder().file("mixed", data).tar()
    blob = gzip.compress(tar, mtime=0)
    layer = _index(blob, span_size=16 * 1024)
    entry = lookup(layer.index, "mixed")
    assert read_ztoc_file(layer, blob, entry, InflateMethod.PADDED) == data
    assert read_ztoc_file(layer, blob, entry, InflateMethod.PRIMED) == data
    with pytest.raises(LayerFormatError):
        read_ztoc_file(layer, blob, entry, InflateMethod.SHIFTED)


def test_schema_field_ids_match_soci() -> None:
    """Read the bytes with a walker written from soci's schema alone (no generated code)."""
    tar = TarBuilder().file("a", b"x" * 1000).tar()
    blob = gzip.compress(tar, mtime=0)
    data = build_ztoc(io.BytesIO(blob), build_tool="tool-id").data

    def table(pos: int) -> tuple[int, int, int]:
        vtable = pos - struct.unpack_from("<i", data, pos)[0]
        return pos, vtable, struct.unpack_from("<H", data, vtable)[0]

    def field(tab: tuple[int, int, int], index: int) -> int:
        pos, vtable, size = tab
        if 4 + 2 * index >= size:
            return 0
        offset: int = struct.unpack_from("<H", data, vtable + 4 + 2 * index)[0]
        return pos + offset if offset else 0

    def ref(at: int) -> int:
        return at + int(struct.unpack_from("<I", data, at)[0])

    def string(at: int) -> bytes:
        target = ref(at)
        return data[target + 4 : target + 4 + struct.unpack_from("<I", data, target)[0]]

    root = table(ref(0))
    assert string(field(root, 0)) == b"0.9"  # version
    assert string(field(root, 1)) == b"tool-id"  # build_tool_identifier
    assert struct.unpack_from("<q", data, field(root, 2))[0] == len(blob)
    toc = table(ref(field(root, 4)))
    vector = ref(field(toc, 0))
    first = table(ref(vector + 4))
    assert string(field(first, 0)) == b"a"  # name
    assert string(field(first, 1)) == b"reg"  # type
    assert struct.unpack_from("<q", data, field(first, 2))[0] == 512  # uncompressed_offset
    assert struct.unpack_from("<q", data, field(first, 3))[0] == 1000  # uncompressed_size
    info = table(ref(field(root, 5)))
    checkpoints = ref(field(info, 3))
    count, span = struct.unpack_from("<iq", data, checkpoints + 4)
    assert (count, span) == (1, 4 * 1024 * 1024)
    assert field(info, 1) == 0  # max_span_id 0 is the default, so absent (as Go writes it)
    assert field(info, 0) == 0  # compression_algorithm: Gzip is the default, so absent


def test_version_one_checkpoint_list_restores_the_first_checkpoint() -> None:
    tar = busybox_tar()
    blob = gzip.compress(tar, mtime=0)
    table = _index(blob).spans
    current = pack_checkpoints(table.span_size, table.checkpoints)
    # Version 1 wrote the count of all checkpoints but left out checkpoint 0.
    version_one = current[:12] + current[12 + 17 + WINDOW_SIZE :]
    parsed = parse_checkpoints(
        version_one, compressed_size=len(blob), max_checkpoints=1000, max_span_bytes=1 << 30
    )
    assert parsed.checkpoints == table.checkpoints  # gzip.compress writes a 10-byte header


def test_not_gzip_is_refused() -> None:
    with pytest.raises(ZtocBuildError):
        build_ztoc(io.BytesIO(b"not gzip at all" * 10))
    truncated = gzip.compress(busybox_tar(), mtime=0)[:-5000]
    with pytest.raises(ZtocBuildError):
        build_ztoc(io.BytesIO(truncated))


def test_index_build_reports_sizes() -> None:
    tar = busybox_tar()
    blob = gzip.compress(tar, mtime=0)
    built = build_ztoc(io.BytesIO(blob), span_size=SPAN)
    assert built.compressed_size == len(blob)
    assert built.uncompressed_size <= len(tar)
    assert built.entries == len(tar_view(tar))


def test_serializer_matches_soci_byte_for_byte() -> None:
    """soci's TestWriteZtoc marshals this zTOC (2 zero-value members, 64 KiB of zero
    checkpoint bytes) and pins its digest and size; the same content must give the same bytes."""
    empty = ZtocFile(name="", type="", offset=0, size=0, mod_time="0001-01-01T00:00:00Z")
    data = encode_ztoc(
        files=[empty, empty],
        checkpoints=bytes(1 << 16),
        span_digests=[],
        max_span_id=3,
        build_tool="AWS SOCI CLI",
        compressed_size=2_000_000,
        uncompressed_size=2_500_000,
    )
    assert len(data) == 65928
    assert sha(data) == "sha256:eba28fdf50b1b57543f57dd051b2468c1d4f57b64d2006c75aa4de1d03e6c7ec"


class _CountingBlob(io.BytesIO):
    """Counts the bytes read from it, seeks and all."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_index_build_reads_the_blob_once_and_hashes_every_span() -> None:
    # Text-like bytes: deflate's Huffman blocks end inside bytes, so spans start with bits.
    words = [random.Random(7).randbytes(5).hex().encode() for _ in range(300)]
    pick = random.Random(8)
    tar = TarBuilder().file("words", b" ".join(pick.choice(words) for _ in range(120_000))).tar()
    blob = gzip.compress(tar + busybox_tar(), mtime=0)
    counting = _CountingBlob(blob)
    built = build_ztoc(counting, span_size=SPAN)
    assert counting.bytes_read == len(blob)  # before: twice, once more to hash the spans
    layer = parse_ztoc(built.data, blob_size=len(blob), ztoc_digest=built.digest)
    assert any(point.bits for point in layer.spans.checkpoints)
    assert layer.span_digests is not None and len(layer.span_digests) == len(layer.spans) > 3
    for span, digest in enumerate(layer.span_digests):
        begin, end = layer.spans.compressed_range(span)
        assert sha(blob[begin:end]) == digest
