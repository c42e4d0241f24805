"""Bounds-check a zTOC FlatBuffer before the generated accessors read it.

The Python FlatBuffers runtime trusts every offset: out-of-range reads raise whatever
``struct`` raises, and strings running past the end come back silently short. This walks the
buffer once along the zTOC schema, as FlatBuffers' own C++ verifier does, so that afterwards
every table, string and vector the reader touches lies inside the buffer.
"""

from __future__ import annotations

import struct
from typing import Final

from fusefs.formats.errors import LayerFormatError

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")

# Field kinds of the schema, per table in field-id order.
_STRING: Final = "string"
_BYTES: Final = "bytes"
_STRINGS: Final = "strings"
_SCALAR_SIZES = {"byte": 1, "int": 4, "uint": 4, "long": 8}
_SCHEMA: dict[str, tuple[str, ...]] = {
    "Ztoc": (_STRING, _STRING, "long", "long", "table:TOC", "table:CompressionInfo"),
    "TOC": ("tables:FileMetadata",),
    "FileMetadata": (
        _STRING,
        _STRING,
        "long",
        "long",
        _STRING,
        "long",
        "uint",
        "uint",
        _STRING,
        _STRING,
        _STRING,
        "long",
        "long",
        "tables:Xattr",
    ),
    "Xattr": (_STRING, _STRING),
    "CompressionInfo": ("byte", "int", _STRINGS, _BYTES),
}


class _Verifier:
    def __init__(self, buf: bytes, max_vector: int) -> None:
        self.buf = buf
        self.size = len(buf)
        self.max_vector = max_vector
        # Tables already checked: elements of many vectors may share one table, and walking
        # it again each time would let a small buffer cost quadratic time.
        self.seen: set[tuple[str, int]] = set()

    def _u32(self, at: int) -> int:
        self._need(at, 4)
        value: int = _U32.unpack_from(self.buf, at)[0]
        return value

    def _need(self, at: int, length: int) -> None:
        if at < 0 or length < 0 or at + length > self.size:
            raise LayerFormatError(f"zTOC reference [{at}, {at + length}) is outside the buffer")

    def table(self, name: str, pos: int) -> None:
        if (name, pos) in self.seen:
            return
        self.seen.add((name, pos))
        self._need(pos, 4)
        vtable = pos - _I32.unpack_from(self.buf, pos)[0]
        self._need(vtable, 4)
        vt_size, obj_size = (
            _U16.unpack_from(self.buf, vtable)[0],
            _U16.unpack_from(self.buf, vtable + 2)[0],
        )
        if vt_size < 4 or vt_size % 2:
            raise LayerFormatError(f"zTOC {name} has a malformed vtable")
        self._need(vtable, vt_size)
        self._need(pos, obj_size)
        for field, kind in enumerate(_SCHEMA[name]):
            slot = 4 + 2 * field
            if slot + 2 > vt_size:
                break
            offset = _U16.unpack_from(self.buf, vtable + slot)[0]
            if offset == 0:
                continue
            width = _SCALAR_SIZES.get(kind, 4)
            if offset + width > obj_size:
                raise LayerFormatError(f"zTOC {name} field {field} lies outside its table")
            if kind not in _SCALAR_SIZES:
                self.reference(kind, pos + offset)

    def reference(self, kind: str, at: int) -> None:
        target = at + self._u32(at)
        if kind.startswith("table:"):
            self.table(kind[6:], target)
            return
        count = self._u32(target)
        if kind in (_STRING, _BYTES):
            self._need(target + 4, count)
            return
        if count > self.max_vector:
            raise LayerFormatError(f"zTOC vector of {count} elements is over the limit")
        self._need(target + 4, 4 * count)
        element = "string" if kind == _STRINGS else "table:" + kind.split(":", 1)[1]
        for index in range(count):
            self.reference(element, target + 4 + 4 * index)


def verify_ztoc_buffer(buf: bytes, *, max_vector: int) -> None:
    """Raise LayerFormatError unless every reference in the zTOC ``buf`` stays inside it."""
    verifier = _Verifier(buf, max_vector)
    verifier.table("Ztoc", verifier._u32(0))
