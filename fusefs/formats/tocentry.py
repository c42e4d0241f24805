"""One TOC entry as a typed msgspec Struct, and msgspec's errors as LayerFormatErrors (pure).

Decoding a TOC straight into these Structs runs the JSON parse and the type and range checks
of every field in C: the builder then only checks what depends on the limits or on other
entries. Unknown fields are ignored (writers add their own). ``gc=False``: an entry holds only
strings, ints and a dict of strings, never a cycle, and 100k untracked objects keep the cyclic
collector from walking them while the index is built.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from fusefs.formats.errors import LayerFormatError

_U32 = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
_U63 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_DEVICE = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]


class TocEntry(msgspec.Struct, gc=False, rename="camel"):
    """The fields of an eStargz / containers/storage TOC entry that lazysnap reads."""

    name: str
    type: str
    size: _U63 = 0
    mode: _U32 = 0
    uid: _U32 = 0
    gid: _U32 = 0
    modtime: str | None = None
    link_name: str = ""
    dev_major: _DEVICE = 0
    dev_minor: _DEVICE = 0
    xattrs: dict[str, str] | None = None
    digest: str | None = None
    offset: _U63 = 0
    end_offset: _U63 = 0
    inner_offset: _U63 = 0
    chunk_offset: _U63 = 0
    chunk_size: _U63 = 0
    chunk_digest: str | None = None
    chunk_type: str | None = None


class TocDocument(msgspec.Struct, gc=False):
    """The TOC's top level; ``version`` is checked by the caller for a clear message.

    The entries stay raw JSON (checked for syntax, not decoded) so that the caller can decode
    them a batch at a time: only one batch of TocEntry Structs and their strings is alive at
    once, instead of every entry of a 100k-entry TOC until the index is built.
    """

    version: Any = None
    entries: list[msgspec.Raw] | None = None


_CONVERT = msgspec.convert


def entry_from_object(value: object, index: int) -> TocEntry:
    """A TOC entry given as a JSON-like dict (zTOC reader, tests), checked as if decoded."""
    try:
        return _CONVERT(value, TocEntry)
    except msgspec.ValidationError as exc:
        raise entry_error(str(exc), index) from exc


_LOCATED = re.compile(r"(?P<what>.*?) - at `\$(?P<path>[^`]*)`", re.DOTALL)
_ENTRY_PATH = re.compile(r"(?:\.entries)?\[(?P<index>\d+)\](?P<rest>.*)", re.DOTALL)
_FIELD = re.compile(r"\.(?P<field>\w+)(?P<rest>.*)", re.DOTALL)


def entry_error(message: str, index: int | None = None) -> LayerFormatError:
    """msgspec's ``Expected `int`, got `str` - at `$.entries[3].mode` `` in the TOC's terms.

    ``index`` is the entry's position when the path does not hold it (a converted entry).
    """
    what, path = message, ""
    located = _LOCATED.fullmatch(message)
    if located is not None:
        what, path = located["what"], located["path"]
    entry = _ENTRY_PATH.fullmatch(path)
    if entry is not None:
        index, path = int(entry["index"]), entry["rest"]
    where = "TOC entry" if index is None else f"TOC entry {index}"
    field = _FIELD.fullmatch(path)
    if field is None:
        if what.startswith("Object missing required field"):
            return LayerFormatError(f"{where} lacks a string 'type' or 'name'")
        if what.startswith("Expected `object`"):
            return LayerFormatError(f"{where} is not an object")
        return LayerFormatError(f"{where} is invalid: {what}")
    name = field["field"]  # msgspec's path names the JSON key
    if name == "xattrs":
        if field["rest"]:
            return LayerFormatError(f"{where}: an xattr value is not a base64 string")
        return LayerFormatError(f"{where}: TOC field 'xattrs' is not an object")
    if what.startswith("Expected `int`, got"):
        return LayerFormatError(f"{where}: TOC field {name!r} is {what[20:]}, not an integer")
    if what.startswith("Expected `int`"):
        return LayerFormatError(
            f"{where}: TOC field {name!r} is out of range ({what[15:]} expected)"
        )
    if what.startswith("Expected `str"):
        return LayerFormatError(f"{where}: TOC field {name!r} is {what[what.find('got') + 4:]}, "
                                "not a string")  # fmt: skip
    return LayerFormatError(f"{where}: TOC field {name!r} is invalid: {what}")
