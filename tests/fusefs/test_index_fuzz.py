"""Property tests: no TOC, however malformed, makes the parsers raise anything but
LayerFormatError, and whatever they accept is a consistent index."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from typing import Any

import trio
from hypothesis import event, given
from hypothesis import strategies as st

from fusefs.formats import (
    IndexLimits,
    LayerFormat,
    LayerFormatError,
    TocLocation,
    index_from_toc,
    load_layer_index,
    write_estargz,
    write_zstd_chunked,
)
from fusefs.formats.builder import build_index
from fusefs.formats.tocdata import iter_toc_entries
from fusefs.index import Codec, EntryKind, LayerIndex
from tests.fusefs.formats_support import MemoryBlob, gzip_member, sha
from tests.fuzzing import fuzz_settings

FUZZ = fuzz_settings(200)
LIMITS = IndexLimits(max_entries=200, max_depth=8)

valid_names = st.lists(st.sampled_from(["a", "b", "c", ".wh.a", "ü"]), min_size=1, max_size=3).map(
    "/".join
)
names = st.one_of(
    valid_names,
    valid_names,
    st.sampled_from(
        ["a", "a/b", "./a/", "/a/b/c", "b", "..", "a/../b", ".wh.a", "a/.wh..wh..opq", "",
         ".prefetch.landmark", ".wh.", "a//b", "ü/ß", "a\x00b", ".wh..wh.plnk", "."]
    ),
    st.text(alphabet="ab/.\\wh\x00é", max_size=12),
)  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
small = st.integers(0, 300)
ints = st.one_of(small, small, small, small, st.integers(-5, 2**64), scalars)
digests = st.one_of(*[st.just(sha(b"x"))] * 4, st.just(""), st.text(max_size=10), scalars)
entry = st.fixed_dictionaries(
    {"name": names, "type": st.sampled_from(
        ["dir", "reg", "reg", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk",
         "chunk", "socket", 7]
    )},
    optional={
        "size": ints,
        "mode": ints,
        "uid": ints,
        "gid": ints,
        "linkName": names,
        "offset": ints,
        "innerOffset": ints,
        "endOffset": ints,
        "chunkOffset": ints,
        "chunkSize": ints,
        "chunkDigest": digests,
        "digest": digests,
        "chunkType": st.sampled_from(["", "zeros", "data", 1]),
        "modtime": st.one_of(
            st.sampled_from(["2024-01-01T00:00:00Z", "2024-13-01T00:00:00Z", "1-1-1"]), scalars
        ),
        "devMajor": ints,
        "devMinor": ints,
        "xattrs": st.one_of(
            st.dictionaries(st.text(max_size=5), st.one_of(st.sampled_from(["eQ==", "!"]), scalars),
                            max_size=3),
            scalars,
        ),
    },
)  # fmt: skip
clean_entry = st.fixed_dictionaries(
    {
        "name": valid_names,
        "type": st.sampled_from(["dir", "reg", "reg", "symlink", "hardlink", "char", "chunk"]),
    },
    optional={
        "size": small,
        "mode": small,
        "linkName": valid_names,
        "offset": small,
        "innerOffset": st.integers(0, 3),
        "endOffset": st.integers(0, 1000),
        "chunkOffset": small,
        "chunkSize": small,
        "chunkDigest": st.just(sha(b"x")),
        "digest": st.just(sha(b"y")),
        "chunkType": st.sampled_from(["", "zeros"]),
        "xattrs": st.dictionaries(
            st.sampled_from(["user.a", "user.b"]), st.just("eQ=="), max_size=2
        ),
    },
)
entries = st.lists(st.one_of(clean_entry, clean_entry, entry), max_size=25)


def check_consistent(index: LayerIndex) -> None:
    assert index.attr(0).kind == EntryKind.DIR
    seen = {0}
    stack = [0]
    while stack:
        directory = stack.pop()
        for name, child in index.children(directory):
            assert index.lookup(directory, name) == child
            assert name and b"/" not in name and name not in (b".", b"..")
            attr = index.attr(child)
            if attr.kind == EntryKind.DIR:
                assert child not in seen
                assert index.parent(child) == directory
                stack.append(child)
            seen.add(child)
            if attr.kind == EntryKind.REG:
                offset = 0
                for chunk in index.chunks(child):
                    assert chunk.file_offset == offset and chunk.size > 0
                    assert chunk.blob_offset <= chunk.blob_end <= 1000
                    offset += chunk.size
                assert offset == attr.size
    assert seen == set(range(index.entry_count))


@FUZZ
@given(entries, st.sampled_from([Codec.GZIP, Codec.ZSTD]))
def test_build_index_accepts_or_raises_format_error(toc: list[Any], codec: Codec) -> None:
    try:
        index = build_index(toc, codec=codec, toc_digest=sha(b""), payload_end=1000, limits=LIMITS)
    except LayerFormatError as exc:
        event(f"rejected: {str(exc)[:25]}")
        return
    event(f"accepted with {min(index.entry_count, 5)}+ entries")
    check_consistent(index)


@FUZZ
@given(st.one_of(st.binary(max_size=300), entries.map(lambda e: json.dumps(
    {"version": 1, "entries": e}).encode())))  # fmt: skip
def test_toc_documents_from_bytes(data: bytes) -> None:
    try:
        toc = list(iter_toc_entries(data, LIMITS))
        index = build_index(
            toc, codec=Codec.GZIP, toc_digest=sha(b""), payload_end=1000, limits=LIMITS
        )
    except LayerFormatError:
        return
    check_consistent(index)


@FUZZ
@given(
    json_text=st.text(alphabet='{}[]",:0123456789 versionentriesnamtyp\\u', max_size=80),
    mutate=st.integers(0, 100),
)
def test_mutated_json_documents(json_text: str, mutate: int) -> None:
    base = '{"version": 1, "entries": [{"name": "a", "type": "dir"}]}'
    cut = mutate % (len(base) + 1)
    data = (base[:cut] + json_text + base[cut:]).encode()
    with contextlib.suppress(LayerFormatError):
        list(iter_toc_entries(data, LIMITS))


@FUZZ
@given(
    payload=st.binary(max_size=600),
    fmt=st.sampled_from(list(LayerFormat)),
    gzip_it=st.booleans(),
    uncompressed=st.integers(0, 5000),
)
def test_index_from_arbitrary_toc_bytes(
    payload: bytes, fmt: LayerFormat, gzip_it: bool, uncompressed: int
) -> None:
    data = gzip_member(payload) if gzip_it else payload
    location = TocLocation(
        format=fmt,
        toc_offset=100,
        toc_length=len(data),
        toc_uncompressed=None if fmt is LayerFormat.ESTARGZ else uncompressed,
        payload_end=100,
        footer_size=51,
    )
    with contextlib.suppress(LayerFormatError):
        index_from_toc(location, data, limits=LIMITS)


def _writer_blobs() -> list[bytes]:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in (("d/a", b"a" * 3000), ("d/b", b""), ("c", bytes(5000))):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    blobs = []
    for write, options in (
        (write_estargz, {"chunk_size": 1024}),
        (write_zstd_chunked, {"chunk_size": 1024}),
        (write_zstd_chunked, {"chunk_size": 2048, "legacy": True}),
    ):
        out = io.BytesIO()
        plain.seek(0)
        write(plain, out, **options)
        blobs.append(out.getvalue())
    return blobs


WRITER_BLOBS = _writer_blobs()


@FUZZ
@given(
    which=st.integers(0, len(WRITER_BLOBS) - 1),
    flips=st.lists(st.tuples(st.integers(1, 400), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_damaged_blob_tails_only_raise_format_errors(
    which: int, flips: list[tuple[int, int]]
) -> None:
    blob = bytearray(WRITER_BLOBS[which])
    for back, mask in flips:
        blob[-min(back, len(blob))] ^= mask  # the TOC and footer live at the end

    async def main() -> None:
        await load_layer_index(MemoryBlob(bytes(blob)))

    with contextlib.suppress(LayerFormatError):
        trio.run(main)
