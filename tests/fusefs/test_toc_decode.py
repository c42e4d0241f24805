"""The TOC decoded by msgspec into TocEntry Structs, and the documents kept on the json path.

toc_entries decodes a whole TOC at once when it can tell that neither a second ``entries``
key nor more entries than the limit can be in it; other documents take iter_toc_entries.
Both must accept and reject the same documents.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fusefs.formats import IndexLimits, LayerFormatError, tocdata
from fusefs.formats.builder import build_index
from fusefs.formats.tocdata import toc_entries
from fusefs.formats.tocentry import TocEntry
from fusefs.index import Codec
from tests.fusefs.formats_support import sha
from tests.fusefs.test_index_hostile import load_entries, reg

LIMITS = IndexLimits()


def document(entries: list[Any], **top: Any) -> bytes:
    return json.dumps({"version": 1, "entries": entries, **top}).encode()


def build(data: bytes, limits: IndexLimits = LIMITS) -> Any:
    return build_index(
        toc_entries(data, limits), codec=Codec.GZIP, toc_digest=sha(b""), payload_end=1 << 40,
        limits=limits,
    )  # fmt: skip


def test_an_ordinary_toc_is_decoded_into_structs() -> None:
    entries = list(toc_entries(document([{"name": "a", "type": "dir"}, reg("a/f")]), LIMITS))
    assert all(type(e) is TocEntry for e in entries)
    assert entries[1].chunk_digest == reg("a/f")["chunkDigest"]


def test_entries_are_decoded_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only one batch of Structs is alive at once: an invalid entry in a later batch is not
    # decoded (nor found) before the builder has taken the earlier batches.
    monkeypatch.setattr(tocdata, "ENTRY_BATCH_SIZE", 2)
    entries = [reg(f"f{i}", size=0) for i in range(5)] + [reg("bad", mode="0644")]
    decoded = iter(toc_entries(document(entries), LIMITS))
    assert [next(decoded).name for _ in range(4)] == ["f0", "f1", "f2", "f3"]
    with pytest.raises(LayerFormatError, match="TOC entry 5: TOC field 'mode' is `str`"):
        list(decoded)


def test_a_name_that_is_not_utf8_is_a_format_error() -> None:
    data = document([reg("NAME", size=0)]).replace(b"NAME", b"\xff")
    with pytest.raises(LayerFormatError, match="not valid UTF-8"):
        build(data)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"name": "a", "type": "dir", "innerOffset": None}, "innerOffset"),
        ({"name": "a", "type": "dir", "size": None}, "size"),
        ({"name": "c", "type": "char", "chunkDigest": 1.5}, "chunkDigest"),
        ({"name": "a", "type": "reg", "size": 0, "chunkSize": False}, "chunkSize"),
        ({"name": "a", "type": "reg", "size": 0, "digest": 0}, "digest"),
    ],
)
def test_a_mistyped_field_is_rejected_even_where_its_entry_does_not_use_it(
    entry: dict[str, Any], field: str
) -> None:
    with pytest.raises(LayerFormatError, match=f"TOC entry 0: TOC field '{field}'"):
        load_entries([entry])


def test_errors_name_the_entry() -> None:
    entries = [{"name": "d", "type": "dir"}, reg("d/a"), reg("d/b", mode="0644")]
    with pytest.raises(LayerFormatError, match="TOC entry 2: TOC field 'mode' is `str`"):
        load_entries(entries)
    with pytest.raises(LayerFormatError, match=r"TOC entry 1: TOC field 'uid' is out of range"):
        load_entries([reg("a"), reg("b", uid=1 << 32)])


def test_a_root_file_named_entries_loads() -> None:
    # A second literal "entries" sends the document down the json path, which reads it too.
    index = build(document([reg("entries", size=0, offset=0)]))
    assert index.lookup(0, b"entries") is not None


@pytest.mark.parametrize("key", ['"entries"', '"entri\\u0065s"', '"\\u0065ntries"'])
def test_a_second_entries_list_is_rejected_however_it_is_spelled(key: str) -> None:
    data = b'{"version": 1, "entries": [], ' + key.encode() + b': [{"name": "a", "type": "dir"}]}'
    with pytest.raises(LayerFormatError, match="two entries lists"):
        build(data)


def test_the_entry_limit_holds_when_objects_outnumber_entries() -> None:
    # xattrs objects count as "{" too: the json path then counts the entries themselves.
    entries = [reg(f"f{i}", size=0, xattrs={"user.a": "eQ=="}) for i in range(3)]
    assert len(build(document(entries), IndexLimits(max_entries=5)).children(0)) == 3
    with pytest.raises(LayerFormatError, match="more than"):
        build(document(entries), IndexLimits(max_entries=2))


def test_an_escaped_ampersand_keeps_the_fast_path() -> None:
    data = document([{"name": "a&b", "type": "dir"}]).replace(b"&", b"\\u0026")
    (entry,) = toc_entries(data, LIMITS)
    assert type(entry) is TocEntry and entry.name == "a&b"
