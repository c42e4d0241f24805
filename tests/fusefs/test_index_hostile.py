"""Hostile or malformed TOCs, footers and annotations are rejected with LayerFormatError."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
import zstandard

from fusefs.formats import (
    ESTARGZ_TOC_DIGEST,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    CompactLayerIndex,
    IndexLimits,
    LayerFormatError,
    load_layer_index,
)
from fusefs.formats.builder import build_index
from fusefs.formats.footer import (
    build_estargz_footer,
    build_zstd_footer,
    build_zstd_legacy_footer,
    skippable_frame,
)
from fusefs.formats.tocdata import iter_toc_entries
from fusefs.index import Codec, EntryKind
from tests.fusefs.formats_support import (
    MemoryBlob,
    estargz_blob,
    payload_members,
    sha,
)

CONTENT = b"hello world\n"
PAYLOAD, (OFFSET,) = payload_members(CONTENT)


def reg(name: str, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "type": "reg",
        "size": len(CONTENT),
        "offset": OFFSET,
        "chunkDigest": sha(CONTENT),
        "mode": 0o644,
    }
    entry.update(extra)
    return entry


def load(blob: bytes, **kwargs: Any) -> CompactLayerIndex:
    async def main() -> Any:
        return await load_layer_index(MemoryBlob(blob), **kwargs)

    index = trio.run(main)
    assert isinstance(index, CompactLayerIndex)
    return index


def load_entries(entries: list[dict[str, Any]], **kwargs: Any) -> CompactLayerIndex:
    return load(estargz_blob(entries, payload=PAYLOAD), **kwargs)


def test_valid_hand_made_toc_loads() -> None:
    index = load_entries([{"name": "./", "type": "dir", "mode": 0o700}, reg("/etc/motd")])
    etc = index.lookup(0, b"etc")
    assert etc is not None and index.attr(0).mode & 0o777 == 0o700
    motd = index.lookup(etc, b"motd")
    assert motd is not None
    assert index.attr(etc).mode & 0o777 == 0o755  # implied directory
    (chunk,) = index.chunks(motd)
    assert (chunk.blob_offset, chunk.blob_end) == (OFFSET, len(PAYLOAD))


HOSTILE: dict[str, tuple[list[Any], str]] = {
    "parent-escape": ([reg("../etc/passwd")], "'..'"),
    "inner-escape": ([reg("a/../../x")], "'..'"),
    "dotdot-only": ([{"name": "..", "type": "dir"}], "'..'"),
    "nul-in-name": ([reg("a\u0000b")], "NUL"),
    "duplicate-file": ([reg("a"), reg("a")], "duplicate"),
    "duplicate-dir": ([{"name": "d/", "type": "dir"}, {"name": "d", "type": "dir"}], "duplicate"),
    "file-then-dir": ([reg("a"), {"name": "a", "type": "dir"}], "duplicate"),
    "file-as-parent": ([reg("a"), reg("a/b")], "used as a directory"),
    "duplicate-root": ([{"name": "./", "type": "dir"}, {"name": "/", "type": "dir"}], "root"),
    "file-root": ([reg("./")], "root"),
    "hardlink-missing": ([{"name": "l", "type": "hardlink", "linkName": "nope"}], "missing"),
    "hardlink-later": (
        [{"name": "l", "type": "hardlink", "linkName": "a"}, reg("a")],
        "missing",
    ),
    "hardlink-dir": (
        [{"name": "d", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}],
        "directory",
    ),
    "hardlink-escape": (
        [reg("a"), {"name": "l", "type": "hardlink", "linkName": "../a"}],
        "'..'",
    ),
    "chunk-outside-blob": ([reg("a", offset=len(PAYLOAD) + 100)], "outside"),
    "chunk-at-toc": ([reg("a", offset=len(PAYLOAD))], "outside"),
    "chunk-size-mismatch": ([reg("a", chunkSize=5)], "do not add up"),
    "chunk-gap": (
        [
            reg("a", size=20, chunkSize=10),
            {
                "name": "a",
                "type": "chunk",
                "offset": OFFSET,
                "chunkOffset": 12,
                "chunkDigest": sha(b""),
            },
        ],
        "do not add up",
    ),
    "chunk-beyond-size": (
        [
            reg("a"),
            {
                "name": "a",
                "type": "chunk",
                "offset": OFFSET,
                "chunkOffset": 50,
                "chunkDigest": sha(b""),
            },
        ],
        "overlap or exceed",
    ),
    "chunk-orphan": (
        [{"name": "a", "type": "chunk", "offset": OFFSET, "chunkOffset": 1}],
        "does not follow",
    ),
    "chunk-other-file": (
        [reg("a"), {"name": "b", "type": "chunk", "offset": OFFSET, "chunkOffset": 1}],
        "does not follow",
    ),
    "chunk-of-empty-file": (
        [reg("a", size=0), {"name": "a", "type": "chunk", "offset": OFFSET, "chunkOffset": 1}],
        "empty file",
    ),
    "reg-chunk-offset": ([reg("a", chunkOffset=3)], "chunkOffset"),
    "no-digest": ([reg("a", chunkDigest="")], "no digest"),
    "bad-digest": ([reg("a", chunkDigest="sha256:xyz")], "sha256"),
    "bad-file-digest": ([reg("a", chunkDigest="", digest="sha256:0")], "sha256"),
    "md5-digest": ([reg("a", chunkDigest="md5:" + "0" * 32)], "sha256"),
    "unknown-type": ([{"name": "s", "type": "socket"}], "unknown TOC entry type"),
    "unknown-chunk-type": ([reg("a", chunkType="holes")], "chunkType"),
    "bad-base64-xattr": ([reg("a", xattrs={"user.x": "!!!"})], "base64"),
    "xattr-not-string": ([reg("a", xattrs={"user.x": 5})], "base64"),
    "xattrs-not-object": ([reg("a", xattrs=["x"])], "xattrs"),
    "mode-string": ([reg("a", mode="0755")], "not an integer"),
    "mode-bool": ([reg("a", mode=True)], "not an integer"),
    "negative-size": ([reg("a", size=-1)], "out of range"),
    "huge-size": ([reg("a", size=1 << 62)], "out of range"),
    "uid-too-big": ([reg("a", uid=1 << 32)], "out of range"),
    "bad-modtime": ([reg("a", modtime="yesterday")], "RFC 3339"),
    "bad-date": ([reg("a", modtime="2023-02-30T00:00:00Z")], "date"),
    "entry-not-object": (["a"], "not an object"),
    "name-missing": ([{"type": "reg"}], "string 'type' or 'name'"),
    "empty-whiteout": ([reg(".wh.", size=0)], "names nothing"),
    "whiteout-conflict": ([reg("x"), reg(".wh.x", size=0)], "conflicts"),
    "file-after-whiteout": ([reg(".wh.x", size=0), reg("x")], "duplicate"),
    "whiteout-dir": ([{"name": ".wh.d", "type": "dir"}], "directory"),
    "symlink-no-target": ([{"name": "s", "type": "symlink"}], "no target"),
    # The kernel's readlink on FUSE takes at most 4095 bytes and answers EIO past that.
    "symlink-target-4096": (
        [{"name": "s", "type": "symlink", "linkName": "t" * 4096}],
        "4096 bytes is over the kernel's 4095",
    ),
    "device-number-too-big": (
        [{"name": "c", "type": "char", "devMajor": 1 << 40}],
        "out of range",
    ),
    "long-component": ([reg("x" * 256)], "too long"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_entries_are_rejected(case: str) -> None:
    entries, message = HOSTILE[case]
    with pytest.raises(LayerFormatError, match=message):
        load_entries(entries)


def test_the_longest_symlink_target_the_kernel_reads_is_kept() -> None:
    target = "d/" * 2047 + "t"  # 4095 bytes
    index = load_entries([{"name": "s", "type": "symlink", "linkName": target}])
    link = index.lookup(0, b"s")
    assert link is not None and index.readlink(link) == target.encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_trusted_xattrs_from_the_image_never_reach_overlayfs() -> None:
    # As containerd's unpacker: trusted.* from an image is dropped, other namespaces are kept.
    hostile = {
        "trusted.overlay.opaque": b64(b"y"),
        "trusted.overlay.redirect": b64(b"/etc"),
        "trusted.overlay.metacopy": b64(b""),
        "trusted.other": b64(b"x"),
        "user.kept": b64(b"1"),
        "security.capability": b64(b"\x01"),
    }
    index = load_entries([
        {"name": "./", "type": "dir", "xattrs": hostile},
        {"name": "d/", "type": "dir", "xattrs": hostile},
        {"name": "o/", "type": "dir", "xattrs": hostile},
        reg("o/.wh..wh..opq", size=0),
        reg("f", xattrs=hostile),
    ])
    plain = {b"user.kept": b"1", b"security.capability": b"\x01"}
    d, o, f = (index.lookup(0, name) for name in (b"d", b"o", b"f"))
    assert d is not None and o is not None and f is not None
    for entry in (0, d, f):
        assert index.xattrs(entry) == plain
    # The opaque marker the layer's own whiteout asks for is still served.
    assert index.xattrs(o) == {**plain, b"trusted.overlay.opaque": b"y"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "not an object"),
        ({"version": 2, "entries": []}, "version"),
        ({"version": "1", "entries": []}, "version"),
        ({"version": 1}, "entries"),
        ({"version": 1, "entries": {}}, "entries"),
    ],
)
def test_malformed_documents_are_rejected(document: Any, message: str) -> None:
    with pytest.raises(LayerFormatError, match=message):
        load(estargz_blob(document=document))


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"version": 1, "entries": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"version": ' + b"[" * 100_000 + b"]" * 100_000 + b', "entries": []}',
        b'{"version": 1e999999}',
        b'{"version": 1, "entries": []} trailing',
        b'{"version": 1, "entries": [], "entries": []}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"},]}',
    ],
)
def test_invalid_json_is_rejected(raw: bytes) -> None:
    with pytest.raises(LayerFormatError):
        load(estargz_blob(raw_json=raw))


def test_entry_count_limit() -> None:
    entries = [reg(f"f{i}", size=0) for i in range(5)]
    with pytest.raises(LayerFormatError, match="more than"):
        load_entries(entries, limits=IndexLimits(max_entries=4))
    document = json.dumps({"version": 1, "entries": entries}).encode()
    with pytest.raises(LayerFormatError, match="more than the limit of 4 entries"):
        list(iter_toc_entries(document, IndexLimits(max_entries=4)))
    # Implied directories count too.
    with pytest.raises(LayerFormatError, match="implied"):
        load_entries([reg("a/b/c/d/e", size=0)], limits=IndexLimits(max_entries=4))


def test_decompression_bomb_is_bounded() -> None:
    # A TOC of 20 MB of whitespace compresses to ~20 kB; the limit stops it while inflating.
    bomb = b'{"version": 1, "entries": []' + b" " * 20_000_000 + b"}"
    blob = estargz_blob(raw_json=bomb)
    assert len(blob) < 100_000
    with pytest.raises(LayerFormatError, match="exceeds the limit"):
        load(blob, limits=IndexLimits(max_toc_uncompressed=1_000_000))


def test_compressed_toc_limit() -> None:
    blob = estargz_blob([reg("a")], payload=PAYLOAD)
    with pytest.raises(LayerFormatError, match="exceeds the limit"):
        load(blob, limits=IndexLimits(max_toc_compressed=10))


def test_toc_digest_is_verified() -> None:
    blob = estargz_blob([reg("a")], payload=PAYLOAD)
    index = load(blob)
    load(blob, toc_digest=index.toc_digest)
    load(blob, annotations={ESTARGZ_TOC_DIGEST: index.toc_digest})
    wrong = sha(b"something else")
    with pytest.raises(LayerFormatError, match="mismatch"):
        load(blob, toc_digest=wrong)
    with pytest.raises(LayerFormatError, match="mismatch"):
        load(blob, annotations={ESTARGZ_TOC_DIGEST: wrong})
    with pytest.raises(LayerFormatError, match="not a sha256"):
        load(blob, toc_digest="sha256:short")


def test_tampered_toc_fails_the_digest() -> None:
    good = load(estargz_blob([reg("a")], payload=PAYLOAD))
    tampered = estargz_blob([reg("a", mode=0o4777)], payload=PAYLOAD)
    with pytest.raises(LayerFormatError, match="mismatch"):
        load(tampered, toc_digest=good.toc_digest)


# --- footers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "empty"),
        (b"\0" * 100, "no eStargz or zstd:chunked footer"),
        (b"x" * 10, "no eStargz or zstd:chunked footer"),
        (build_estargz_footer(5), "not before the footer"),
        (b"\0" * 10 + build_estargz_footer(1 << 40), "not before the footer"),
        (build_estargz_footer(0).replace(b"STARGZ", b"STARGX"), "TOC offset"),
        (build_estargz_footer(0).replace(b"0000", b"+000", 1), "TOC offset"),
        (b"\0" * 100 + build_zstd_footer(8, 1 << 40, 1, 8, 1, 1), "outside the blob"),
        (b"\0" * 100 + build_zstd_footer(8, 10, 1, 8, 1, 1), "overlaps"),
        (b"\0" * 100 + build_zstd_footer(0, 10, 1, 50, 1, 1), "outside the blob"),
        (b"\0" * 100 + build_zstd_legacy_footer(8, 1000, 1), "outside the blob"),
        (b"\0" * 100 + build_zstd_legacy_footer(8, 10, 1)[8:], "skippable frame"),
        (
            b"\0" * 100 + skippable_frame(b"\0" * 24 + (2).to_bytes(8, "little") + b"GnUlInUx"),
            "manifest type",
        ),
        (b"\0" * 100 + b"\x1f\x8b\x08\x04" + b"\0" * 30 + b"STARGZEXTERNALTOC", "external TOC"),
    ],
)
def test_bad_footers_are_rejected(blob: bytes, message: str) -> None:
    with pytest.raises(LayerFormatError, match=message):
        load(blob)


def _zstd_blob(document: bytes, *, legacy: bool = False, raw_len: int | None = None) -> bytes:
    frame = zstandard.ZstdCompressor().compress(document)
    payload = zstandard.ZstdCompressor().compress(b"\0" * 1024)
    toc_offset = len(payload) + 8
    raw = len(document) if raw_len is None else raw_len
    blob = payload + skippable_frame(frame)
    if legacy:
        return blob + build_zstd_legacy_footer(toc_offset, len(frame), raw)
    ts = zstandard.ZstdCompressor().compress(b"")
    ts_offset = len(blob) + 8
    blob += skippable_frame(ts)
    return blob + build_zstd_footer(toc_offset, len(frame), raw, ts_offset, len(ts), 0)


def test_zstd_toc_size_must_match_the_footer() -> None:
    document = json.dumps({"version": 1, "entries": []}).encode()
    assert load(_zstd_blob(document)).entry_count == 1
    assert load(_zstd_blob(document, legacy=True)).entry_count == 1
    with pytest.raises(LayerFormatError, match="more than"):
        load(_zstd_blob(document, raw_len=len(document) - 1))
    with pytest.raises(LayerFormatError, match="expected"):
        load(_zstd_blob(document, raw_len=len(document) + 1))
    with pytest.raises(LayerFormatError, match="exceeds the limit"):
        load(_zstd_blob(document), limits=IndexLimits(max_toc_uncompressed=5))


def test_zstd_toc_that_is_not_zstd() -> None:
    blob = b"\0" * 64 + skippable_frame(b"not zstd at all") + build_zstd_legacy_footer(72, 15, 15)
    with pytest.raises(LayerFormatError, match="not valid zstd"):
        load(blob)


def test_zstd_annotations_are_checked() -> None:
    document = json.dumps({"version": 1, "entries": []}).encode()
    blob = _zstd_blob(document)
    frame = zstandard.ZstdCompressor().compress(document)
    offset = blob.index(frame)
    position = f"{offset}:{len(frame)}:{len(document)}:1"
    good = {ZSTD_MANIFEST_POSITION: position, ZSTD_MANIFEST_CHECKSUM: sha(frame)}
    assert load(blob, annotations=good).entry_count == 1
    assert load(blob, toc_digest=sha(frame)).entry_count == 1  # the compressed digest also counts
    with pytest.raises(LayerFormatError, match="mismatch"):
        load(blob, annotations={**good, ZSTD_MANIFEST_CHECKSUM: sha(b"x")})
    for bad in ("1:2", "a:b:c:1", f"{offset}:{len(frame)}:{len(document)}:2", "0:5:5:1"):
        with pytest.raises(LayerFormatError):
            load(blob, annotations={ZSTD_MANIFEST_POSITION: bad})
    with pytest.raises(LayerFormatError, match="outside"):
        load(blob, annotations={ZSTD_MANIFEST_POSITION: f"{len(blob)}:10:10:1"})


# --- zstd:chunked compressed ranges -----------------------------------------------------------


def _zstd_entries(*files: tuple[str, int, int]) -> list[Any]:
    return [
        {
            "name": name,
            "type": "reg",
            "size": 4,
            "offset": offset,
            "endOffset": end,
            "digest": sha(b"data"),
        }
        for name, offset, end in files
    ]


def test_zstd_end_offsets_are_checked() -> None:
    limits = IndexLimits()
    ok = build_index(
        _zstd_entries(("a", 10, 20), ("b", 20, 30)),
        codec=Codec.ZSTD,
        toc_digest=sha(b""),
        payload_end=100,
        limits=limits,
    )
    a = ok.lookup(0, b"a")
    assert a is not None and ok.attr(a).kind == EntryKind.REG
    assert [(c.blob_offset, c.blob_end) for c in ok.chunks(a)] == [(10, 20)]
    for files, message in [
        ((("a", 10, 25), ("b", 20, 30)), "overlap"),
        ((("a", 10, 10),), "invalid compressed range"),
        ((("a", 10, 200),), "invalid compressed range"),
    ]:
        with pytest.raises(LayerFormatError, match=message):
            build_index(
                _zstd_entries(*files),
                codec=Codec.ZSTD,
                toc_digest=sha(b""),
                payload_end=100,
                limits=limits,
            )


def test_a_file_with_many_chunks_loads_in_linear_time() -> None:
    # Chunk ranges are resolved from neighbours only; 20k zstd chunks take well under a second
    # (a quadratic scan would take minutes). Not a timing assertion: the test timeout guards it.
    count = 20_000
    entries: list[dict[str, Any]] = [
        {"name": "f", "type": "reg", "size": count, "offset": 10, "endOffset": 10 + 2 * count,
         "chunkSize": 1, "chunkDigest": sha(b"x")},
    ]  # fmt: skip
    entries += [
        {"name": "f", "type": "chunk", "offset": 10 + 2 * i, "chunkOffset": i, "chunkSize": 1,
         "chunkDigest": sha(b"x")}
        for i in range(1, count)
    ]  # fmt: skip
    index = build_index(
        entries, codec=Codec.ZSTD, toc_digest=sha(b""), payload_end=10 + 2 * count,
        limits=IndexLimits(),
    )  # fmt: skip
    f = index.lookup(0, b"f")
    assert f is not None
    chunks = index.chunks(f)
    assert len(chunks) == count
    assert (chunks[-1].blob_offset, chunks[-1].blob_end) == (10 + 2 * (count - 1), 10 + 2 * count)


# --- chunk size ---------------------------------------------------------------------------------


def test_a_chunk_over_the_limit_is_refused_by_default() -> None:
    # A 1 GiB chunk that compresses to a few KiB would cost a GiB of memory on every first read.
    big = 1 << 30
    entry = {"name": "big", "type": "reg", "size": big, "offset": 10, "endOffset": 20,
             "digest": sha(b"")}  # fmt: skip
    with pytest.raises(LayerFormatError, match="over the limit"):
        build_index(
            [entry], codec=Codec.ZSTD, toc_digest=sha(b""), payload_end=100, limits=IndexLimits()
        )


def test_chunk_size_and_inner_offset_are_bounded() -> None:
    limits = IndexLimits(max_chunk_size=64)
    ok = load_entries([reg("a", size=64, chunkDigest=sha(b"x"))], limits=limits)
    assert ok.lookup(0, b"a") is not None
    with pytest.raises(LayerFormatError, match="over the limit"):
        load_entries([reg("a", size=65, chunkDigest=sha(b"x"))], limits=limits)
    # innerOffset bytes are decoded too before the chunk starts.
    with pytest.raises(LayerFormatError, match="over the limit"):
        load_entries([reg("a", size=60, innerOffset=5, chunkDigest=sha(b"x"))], limits=limits)
    # Every chunk counts, not only the first.
    chunked = [
        reg("a", size=100, chunkSize=50, chunkDigest=sha(b"x")),
        {"name": "a", "type": "chunk", "offset": OFFSET, "chunkOffset": 50, "chunkSize": 50,
         "chunkDigest": sha(b"x")},
    ]  # fmt: skip
    assert load_entries(chunked, limits=IndexLimits(max_chunk_size=50)).lookup(0, b"a")
    with pytest.raises(LayerFormatError, match="over the limit"):
        load_entries(chunked, limits=IndexLimits(max_chunk_size=49))


def test_a_hole_larger_than_the_chunk_limit_is_accepted() -> None:
    # zstd:chunked marks a run of zeros as a "zeros" chunk: nothing is decoded, so a hole of a
    # sparse file may be as large as the file.
    size = IndexLimits().max_file_size
    entry = {"name": "sparse", "type": "reg", "size": size, "offset": 0, "endOffset": 0,
             "chunkType": "zeros", "chunkSize": size}  # fmt: skip
    index = build_index(
        [entry], codec=Codec.ZSTD, toc_digest=sha(b""), payload_end=100, limits=IndexLimits()
    )
    sparse = index.lookup(0, b"sparse")
    assert sparse is not None
    (chunk,) = index.chunks(sparse)
    assert chunk.zeros and chunk.size == size
