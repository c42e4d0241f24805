"""Semantics of the compact LayerIndex: ids, implied directories, whiteouts, landmarks, lookups."""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
from typing import Any

import pytest
import trio

from fusefs.formats import CompactLayerIndex, load_layer_index
from fusefs.formats.modtime import format_modtime, parse_modtime
from fusefs.index import ChunkRef, EntryKind
from tests.fusefs.formats_support import MemoryBlob, estargz_blob, payload_members, read_file, sha

ONE, TWO, THREE = b"one\n", b"two two\n", b"three three three\n"
PAYLOAD, OFFSETS = payload_members(ONE, TWO, THREE)


def reg(name: str, content: bytes, offset: int, **extra: Any) -> dict[str, Any]:
    entry = {
        "name": name, "type": "reg", "size": len(content), "offset": offset,
        "chunkDigest": sha(content), "mode": 0o644,
    }  # fmt: skip
    entry.update(extra)
    return entry


def load(entries: list[dict[str, Any]]) -> CompactLayerIndex:
    async def main() -> Any:
        return await load_layer_index(MemoryBlob(estargz_blob(entries, payload=PAYLOAD)))

    index = trio.run(main)
    assert isinstance(index, CompactLayerIndex)
    return index


def test_ids_are_dense_in_toc_order_with_implied_directories() -> None:
    index = load([
        reg("a/b/c", ONE, OFFSETS[0]),
        {"name": "a/", "type": "dir", "mode": 0o700, "uid": 5, "modtime": "2021-01-01T00:00:00Z"},
        reg("d", TWO, OFFSETS[1]),
    ])  # fmt: skip
    assert index.entry_count == 5
    assert [index.path(e) for e in range(5)] == ["", "a", "a/b", "a/b/c", "d"]
    a = index.attr(1)
    assert (a.kind, a.mode, a.uid) == (EntryKind.DIR, stat.S_IFDIR | 0o700, 5)
    assert a.mtime_ns == parse_modtime("2021-01-01T00:00:00Z")
    implied = index.attr(2)
    assert (implied.mode, implied.uid, implied.mtime_ns) == (stat.S_IFDIR | 0o755, 0, 0)
    assert index.attr(0).nlink == 3 and index.attr(1).nlink == 3 and index.attr(2).nlink == 2
    assert [index.parent(e) for e in range(5)] == [0, 0, 1, 2, 0]


def test_lookup_children_and_errors() -> None:
    index = load(
        [reg("b", ONE, OFFSETS[0]), reg("a", TWO, OFFSETS[1]), reg("B", THREE, OFFSETS[2])]
    )
    assert index.children(0) == [(b"B", 3), (b"a", 2), (b"b", 1)]  # bytewise order
    assert index.lookup(0, b"a") == 2
    assert index.lookup(0, b"c") is None
    assert index.lookup(1, b"x") is None  # not a directory
    assert index.children(1) == ()
    for bad in (-1, 4):
        with pytest.raises(KeyError):
            index.attr(bad)
    with pytest.raises(KeyError):
        index.readlink(1)
    assert read_file(index, estargz_blob(payload=PAYLOAD), 3) == THREE
    assert index.memory_bytes() > 0


def test_whiteouts_and_opaque_directories() -> None:
    index = load([
        {"name": "etc/.wh.passwd", "type": "reg", "uid": 7, "gid": 8},
        {"name": "var/.wh..wh..opq", "type": "reg"},
        {"name": "var/", "type": "dir", "mode": 0o711,
         "xattrs": {"trusted.overlay.opaque": base64.b64encode(b"n").decode()}},
        {"name": "usr/.wh..wh.plnk", "type": "reg"},
    ])  # fmt: skip
    etc = index.lookup(0, b"etc")
    assert etc is not None
    passwd = index.lookup(etc, b"passwd")
    assert passwd is not None
    attr = index.attr(passwd)
    assert (attr.kind, attr.mode, attr.rdev, attr.uid, attr.gid) == (
        EntryKind.CHAR, stat.S_IFCHR, 0, 7, 8,
    )  # fmt: skip
    assert index.lookup(etc, b".wh.passwd") is None
    var = index.lookup(0, b"var")
    assert var is not None
    assert index.xattrs(var) == {b"trusted.overlay.opaque": b"y"}
    assert index.attr(var).mode == stat.S_IFDIR | 0o711
    assert index.children(var) == []
    usr = index.lookup(0, b"usr")
    assert usr is not None and index.children(usr) == []  # aufs metadata is skipped


def test_landmarks() -> None:
    landmark = {"type": "reg", "size": 1, "offset": OFFSETS[1], "chunkDigest": sha(b"\x0f")}
    index = load([
        reg("first", ONE, OFFSETS[0]),
        {"name": ".prefetch.landmark", **landmark},
        reg("rest", THREE, OFFSETS[2]),
    ])  # fmt: skip
    assert index.prefetch_end == OFFSETS[1]
    assert index.lookup(0, b".prefetch.landmark") is None
    first, rest = index.lookup(0, b"first"), index.lookup(0, b"rest")
    assert first is not None and rest is not None
    assert index.chunks(first)[0].blob_end == OFFSETS[1]
    assert list(index.file_entries()) == [first, rest]
    index = load([{"name": ".no.prefetch.landmark", **landmark}])
    assert index.prefetch_end is None and index.children(0) == []
    index = load([{"name": "sub/.prefetch.landmark", **landmark}])  # only at the root
    sub = index.lookup(0, b"sub")
    assert sub is not None and index.lookup(sub, b".prefetch.landmark") is not None


def test_file_entries_follow_blob_order_not_toc_order() -> None:
    index = load([reg("late", THREE, OFFSETS[2]), reg("early", ONE, OFFSETS[0]), reg("e", b"", 0)])
    assert [index.path(e) for e in index.file_entries()] == ["early", "late"]


def test_devices_symlinks_and_xattrs() -> None:
    value = bytes(range(200))
    index = load([
        {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3, "mode": 0o666},
        {"name": "dev/sda", "type": "block", "devMajor": 8, "devMinor": 0},
        {"name": "dev/pipe", "type": "fifo", "mode": 0o600},
        {"name": "bin/sh", "type": "symlink", "linkName": "/bin/busybox"},
        reg("cap", ONE, OFFSETS[0], xattrs={"security.capability": base64.b64encode(value).decode()}),
    ])  # fmt: skip
    dev = index.lookup(0, b"dev")
    assert dev is not None
    null, sda, pipe = (index.lookup(dev, n) for n in (b"null", b"sda", b"pipe"))
    assert null is not None and sda is not None and pipe is not None
    assert index.attr(null).rdev == os.makedev(1, 3)
    assert index.attr(null).mode == stat.S_IFCHR | 0o666
    assert index.attr(sda).rdev == os.makedev(8, 0) and index.attr(sda).kind == EntryKind.BLOCK
    assert index.attr(pipe).mode == stat.S_IFIFO | 0o600
    sh = index.lookup(index.lookup(0, b"bin") or 0, b"sh")
    assert sh is not None and index.readlink(sh) == b"/bin/busybox"
    assert index.attr(sh).size == len(b"/bin/busybox")
    cap = index.lookup(0, b"cap")
    assert cap is not None and index.xattrs(cap) == {b"security.capability": value}
    assert index.xattrs(sh) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2024-05-01T12:00:00.5Z", 1_714_564_800_500_000_000),
        ("2024-05-01T14:00:00.000000001+02:00", 1_714_564_800_000_000_001),
        ("1969-12-31T23:59:59Z", -1_000_000_000),
        ("0001-01-01T00:00:00Z", -(1 << 63)),  # Go's zero time, clamped
        ("", 0),
        (None, 0),
    ],
)
def test_modtimes(text: str | None, expected: int) -> None:
    assert parse_modtime(text) == expected


def test_format_modtime_round_trips() -> None:
    for value in (0, 1_714_564_800_500_000_000, -1_000_000_000, 1_700_000_000_000_000_001):
        assert parse_modtime(format_modtime(value)) == value
    assert format_modtime(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_children_is_a_lazy_sequence() -> None:
    index = load(
        [reg("b", ONE, OFFSETS[0]), reg("a", TWO, OFFSETS[1]), reg("c", THREE, OFFSETS[2])]
    )
    listing = index.children(0)
    assert len(listing) == 3
    assert listing[0] == (b"a", 2) and listing[-1] == (b"c", 3)
    assert listing[1:] == [(b"b", 1), (b"c", 3)]
    assert list(listing) == [(b"a", 2), (b"b", 1), (b"c", 3)]
    assert listing == [(b"a", 2), (b"b", 1), (b"c", 3)]
    with pytest.raises(IndexError):
        listing[3]
    assert (b"b", 1) in listing


def test_format_modtime_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        format_modtime(10**30)


def test_a_chunk_has_each_of_its_fields_where_chunkref_names_it() -> None:
    # compact.py builds ChunkRef positionally (it is walked often): it relies on this order.
    assert [f.name for f in dataclasses.fields(ChunkRef)] == [
        "file_offset", "size", "blob_offset", "blob_end", "inner_offset", "digest", "zeros"]
    index = load([reg("one", ONE, OFFSETS[0]), reg("two", TWO, OFFSETS[1]),
                  reg("three", THREE, OFFSETS[2])])
    two = next(e for e in index.file_entries() if index.path(e) == "two")
    (chunk,) = index.chunks(two)
    assert chunk == ChunkRef(file_offset=0, size=len(TWO), blob_offset=OFFSETS[1],
                             blob_end=OFFSETS[2], inner_offset=0, digest=sha(TWO), zeros=False)
