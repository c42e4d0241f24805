"""Hostile zTOCs and blobs: each is a LayerFormatError (never a crash, never wrong bytes)."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import struct

import flatbuffers
import pytest

from fusefs.formats import IndexLimits, LayerFormatError
from fusefs.formats.errors import ChunkDecodeError, ChunkDigestError
from fusefs.formats.ztoc import Checkpoint, InflateMethod, ZtocLayer, build_ztoc, parse_ztoc, verify
from fusefs.formats.ztoc._fbs import TOC as TocFb
from fusefs.formats.ztoc._fbs import FileMetadata as FileFb
from fusefs.formats.ztoc._fbs import Xattr as XattrFb
from fusefs.formats.ztoc._fbs import Ztoc as ZtocFb
from fusefs.formats.ztoc.checkpoints import WINDOW_SIZE, pack_checkpoints
from tests.fusefs.ztoc_support import FileSpec, encode_ztoc, lookup, read_ztoc_file, sha
from tests.support.oci_image import TarBuilder, busybox_tar

SPAN = 64 * 1024
TAR = busybox_tar()
BLOB = gzip.compress(TAR, mtime=0)
BUILT = build_ztoc(io.BytesIO(BLOB), span_size=SPAN)
GOOD = parse_ztoc(BUILT.data, blob_size=len(BLOB))


def _points() -> list[Checkpoint]:
    return list(GOOD.spans.checkpoints)


def _ztoc(
    files: list[FileSpec] | None = None,
    points: list[Checkpoint] | None = None,
    *,
    digests: list[str] | None = None,
    **overrides: int,
) -> bytes:
    points = _points() if points is None else points
    if files is None:
        files = [FileSpec("bin/busybox", offset=1536, size=1000)]
    spans = [slice(*GOOD.spans.compressed_range(i)) for i in range(len(GOOD.spans))]
    options = {
        "compressed_size": len(BLOB),
        "uncompressed_size": GOOD.uncompressed_size,
        "max_span_id": len(points) - 1,
        "span_digests": [sha(BLOB[s]) for s in spans] if digests is None else digests,
        **overrides,
    }
    return encode_ztoc(files, pack_checkpoints(SPAN, points), **options)  # type: ignore[arg-type]


def _parse(data: bytes, **kwargs: object) -> ZtocLayer:
    return parse_ztoc(data, blob_size=len(BLOB), **kwargs)  # type: ignore[arg-type]


def test_the_helper_makes_an_acceptable_ztoc() -> None:
    layer = _parse(_ztoc())
    assert layer.index.attr(lookup(layer.index, "bin/busybox")).size == 1000


def test_digest_mismatch_is_refused() -> None:
    with pytest.raises(LayerFormatError, match="digest mismatch"):
        _parse(BUILT.data, ztoc_digest=sha(b"other"))


@pytest.mark.parametrize("cut", [0, 3, 4, 40, 1000, len(BUILT.data) // 2])
def test_truncated_buffers(cut: int) -> None:
    with pytest.raises(LayerFormatError):
        _parse(BUILT.data[:cut])


def test_root_offset_out_of_bounds() -> None:
    with pytest.raises(LayerFormatError, match="outside the buffer"):
        _parse(struct.pack("<I", 1 << 30) + BUILT.data[4:])


def test_string_running_past_the_end() -> None:
    # The Python runtime would return a short string silently; the verifier must not.
    data = bytearray(_ztoc([FileSpec("zzzzzzzzzzzzzzzz", offset=1536, size=10)]))
    at = data.find(b"zzzzzzzzzzzzzzzz") - 4
    struct.pack_into("<I", data, at, len(data))
    with pytest.raises(LayerFormatError, match="outside the buffer"):
        _parse(bytes(data))


def test_blob_size_must_match_the_layer() -> None:
    with pytest.raises(LayerFormatError, match="blob of"):
        parse_ztoc(BUILT.data, blob_size=len(BLOB) + 1)


def test_uncompressed_algorithm_is_not_supported() -> None:
    with pytest.raises(LayerFormatError, match="not gzip"):
        _parse(_ztoc(algorithm=2))


def test_max_span_id_must_match() -> None:
    with pytest.raises(LayerFormatError, match="max span id"):
        _parse(_ztoc(max_span_id=len(GOOD.spans)))


def test_checkpoint_past_the_blob() -> None:
    points = _points()
    points[-1] = dataclasses.replace(points[-1], compressed_offset=len(BLOB) + 10)
    with pytest.raises(LayerFormatError, match="outside the blob"):
        _parse(_ztoc(points=points))


def test_checkpoints_out_of_order() -> None:
    points = _points()
    points[1], points[2] = points[2], points[1]
    with pytest.raises(LayerFormatError, match="increasing"):
        _parse(_ztoc(points=points))


def test_window_of_the_wrong_size() -> None:
    packed = bytearray(pack_checkpoints(SPAN, _points()))
    shorter = bytes(packed[: 12 + 17 + WINDOW_SIZE - 100]) + bytes(packed[12 + 17 + WINDOW_SIZE :])
    data = encode_ztoc(
        [],
        shorter,
        compressed_size=len(BLOB),
        uncompressed_size=GOOD.uncompressed_size,
        max_span_id=len(GOOD.spans) - 1,
    )
    with pytest.raises(LayerFormatError, match="32768-byte windows"):
        _parse(data)


def test_bits_out_of_range() -> None:
    points = _points()
    points[1] = dataclasses.replace(points[1], bits=9)
    with pytest.raises(LayerFormatError, match="bits"):
        _parse(_ztoc(points=points))


def test_span_claiming_more_than_deflate_can_hold() -> None:
    points = _points()
    points[2] = dataclasses.replace(points[2], uncompressed_offset=1 << 40)
    points[3:] = []
    with pytest.raises(LayerFormatError, match="claims"):
        _parse(_ztoc(points=points, digests=[]))


def test_span_that_inflates_to_more_than_it_claims() -> None:
    points = _points()
    points[1] = dataclasses.replace(
        points[1], uncompressed_offset=points[1].uncompressed_offset - 1
    )
    layer = _parse(_ztoc(points=points))
    start, end = layer.spans.compressed_range(0)
    for method in (InflateMethod.PADDED, InflateMethod.PRIMED):
        with pytest.raises(ChunkDecodeError, match="promise"):
            layer.inflate(0, BLOB[start:end], method)


def test_span_that_inflates_to_less_than_it_claims() -> None:
    points = _points()
    points[1] = dataclasses.replace(
        points[1], uncompressed_offset=points[1].uncompressed_offset + 1
    )
    layer = _parse(_ztoc(points=points))
    start, end = layer.spans.compressed_range(0)
    for method in (InflateMethod.PADDED, InflateMethod.PRIMED):
        with pytest.raises(ChunkDecodeError):
            layer.inflate(0, BLOB[start:end], method)


def test_wrong_window_gives_an_error_not_wrong_bytes() -> None:
    # Without span digests, a wrong window decodes back references to other bytes; the zTOC
    # digest is what vouches for windows. With digests the compressed bytes are checked, and
    # the window still is part of what the zTOC digest covers.
    points = _points()
    points[1] = dataclasses.replace(points[1], window=bytes(WINDOW_SIZE))
    layer = _parse(_ztoc(points=points), ztoc_digest=None)
    start, end = layer.spans.compressed_range(1)
    good = GOOD.inflate(1, BLOB[start:end])
    with contextlib.suppress(LayerFormatError):
        assert layer.inflate(1, BLOB[start:end]) != good


def test_changed_blob_under_the_index_is_a_digest_error() -> None:
    start, end = GOOD.spans.compressed_range(2)
    changed = bytearray(BLOB[start:end])
    changed[len(changed) // 2] ^= 0x40
    with pytest.raises(ChunkDigestError):
        GOOD.inflate(2, bytes(changed))


def test_changed_blob_without_span_digests_never_gives_wrong_bytes() -> None:
    layer = _parse(_ztoc(digests=[]))
    assert layer.span_digests is None
    start, end = layer.spans.compressed_range(2)
    good = layer.inflate(2, BLOB[start:end])
    changed = bytearray(BLOB[start:end])
    changed[len(changed) // 2] ^= 0x40
    try:
        result = layer.inflate(2, bytes(changed))
    except LayerFormatError:
        return
    # Deflate has no checksum inside a span: a flipped literal can decode to other bytes of
    # the same length. This is why span digests (or the layer digest) must vouch for spans.
    assert result != good


def test_span_of_the_wrong_length_is_refused() -> None:
    start, end = GOOD.spans.compressed_range(1)
    with pytest.raises(ChunkDecodeError, match="needs"):
        GOOD.inflate(1, BLOB[start : end - 1])


def test_span_digest_count_must_match() -> None:
    with pytest.raises(LayerFormatError, match="span digests"):
        _parse(_ztoc(digests=[sha(b"x")]))


def test_span_digest_must_be_sha256() -> None:
    with pytest.raises(LayerFormatError, match="not a sha256"):
        _parse(_ztoc(digests=["md5:00"] * len(GOOD.spans)))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([FileSpec("a", offset=512, size=2000), FileSpec("b", offset=1024, size=10)], "overlaps"),
        ([FileSpec("a", offset=0, size=10)], "overlaps"),
        ([FileSpec("a", offset=512, size=1 << 40)], "runs past"),
        ([FileSpec("a", offset=512, size=-1)], "overlaps"),
        ([FileSpec("../escape", offset=512, size=1)], r"\.\."),
        ([FileSpec("a/../../b", offset=512, size=1)], r"\.\."),
        ([FileSpec("/etc/passwd", offset=512, size=1)], "absolute"),
        ([FileSpec("a", type="socket")], "unknown type"),
        ([FileSpec("a", type="hardlink", linkname="missing")], "missing"),
        ([FileSpec("a", type="symlink")], "no target"),
        ([FileSpec("a", offset=512), FileSpec("a", offset=1024)], "duplicate"),
        ([FileSpec("a", mode=-1)], "mode"),
        ([FileSpec("a", mod_time="yesterday")], "RFC 3339"),
    ],
)
def test_bad_file_tables(files: list[FileSpec], message: str) -> None:
    with pytest.raises(LayerFormatError, match=message):
        _parse(_ztoc(files))


def test_too_many_entries() -> None:
    files = [FileSpec(f"f{i}", offset=512 * (2 * i + 1)) for i in range(20)]
    with pytest.raises(LayerFormatError, match="over the limit"):
        _parse(_ztoc(files), limits=IndexLimits(max_entries=10))


def test_too_many_pax_records() -> None:
    pax = {f"SCHILY.xattr.user.{i}": b"v" for i in range(600)}
    with pytest.raises(LayerFormatError, match="PAX records"):
        _parse(_ztoc([FileSpec("a", pax=pax)]))


def test_only_schily_records_become_xattrs() -> None:
    pax = {"SCHILY.xattr.user.k": b"\x00\xffv", "path": b"a", "LIBARCHIVE.xattr.user.x": b"y"}
    layer = _parse(_ztoc([FileSpec("a", pax=pax)]))
    assert layer.index.xattrs(lookup(layer.index, "a")) == {b"user.k": b"\x00\xffv"}


def test_whiteouts_translate_as_in_other_formats() -> None:
    tar = TarBuilder().dir("d").whiteout("d/gone").file("d/.wh..wh..opq", b"").tar()
    blob = gzip.compress(tar, mtime=0)
    built = build_ztoc(io.BytesIO(blob))
    layer = parse_ztoc(built.data, blob_size=len(blob))
    directory = lookup(layer.index, "d")
    assert layer.index.xattrs(directory) == {b"trusted.overlay.opaque": b"y"}
    gone = layer.index.attr(lookup(layer.index, "d/gone"))
    assert (gone.kind.name, gone.rdev) == ("CHAR", 0)


def test_chunk_past_the_last_span_end_is_an_error() -> None:
    # A file whose content the zTOC places beyond what the last span inflates to.
    files = [FileSpec("late", offset=GOOD.uncompressed_size - 10, size=10)]
    layer = _parse(_ztoc(files, uncompressed_size=GOOD.uncompressed_size + 100_000))
    data = read_ztoc_file(layer, BLOB, lookup(layer.index, "late"))
    assert len(data) == 10  # still inside the stream: the tar's end-of-archive zeros
    files = [FileSpec("beyond", offset=GOOD.uncompressed_size + 50_000, size=10)]
    layer = _parse(_ztoc(files, uncompressed_size=GOOD.uncompressed_size + 100_000))
    with pytest.raises(ChunkDecodeError, match="needs"):
        read_ztoc_file(layer, BLOB, lookup(layer.index, "beyond"))


def test_shared_tables_are_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 3000 file entries all pointing at one table with 3000 PAX records: walking the shared
    # table each time would cost 9 million reference checks for a buffer of ~100 KiB.
    builder = flatbuffers.Builder(1024)
    key = builder.CreateString("k")
    XattrFb.XattrStart(builder)
    XattrFb.XattrAddKey(builder, key)
    record = XattrFb.XattrEnd(builder)
    FileFb.FileMetadataStartXattrsVector(builder, 3000)
    for _ in range(3000):
        builder.PrependUOffsetTRelative(record)
    records = builder.EndVector()
    FileFb.FileMetadataStart(builder)
    FileFb.FileMetadataAddXattrs(builder, records)
    member = FileFb.FileMetadataEnd(builder)
    TocFb.TOCStartMetadataVector(builder, 3000)
    for _ in range(3000):
        builder.PrependUOffsetTRelative(member)
    members = builder.EndVector()
    TocFb.TOCStart(builder)
    TocFb.TOCAddMetadata(builder, members)
    toc = TocFb.TOCEnd(builder)
    ZtocFb.ZtocStart(builder)
    ZtocFb.ZtocAddToc(builder, toc)
    builder.Finish(ZtocFb.ZtocEnd(builder))
    calls = 0
    original = verify._Verifier.reference

    def counting(self: verify._Verifier, kind: str, at: int) -> None:
        nonlocal calls
        calls += 1
        original(self, kind, at)

    monkeypatch.setattr(verify._Verifier, "reference", counting)
    verify.verify_ztoc_buffer(bytes(builder.Output()), max_vector=10_000)
    assert calls < 10_000
