"""CRC-64/ISO as Go's hash/crc64 computes it (tar-split stores it per file). Pure Python."""

from __future__ import annotations

_POLY_ISO = 0xD800000000000000
_MASK = (1 << 64) - 1


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_ISO if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


class Crc64:
    """Incremental CRC-64/ISO; ``digest()`` is big-endian like Go's ``Sum``."""

    __slots__ = ("_crc",)

    def __init__(self) -> None:
        self._crc = _MASK

    def update(self, data: bytes | memoryview) -> None:
        crc = self._crc
        table = _TABLE
        for byte in bytes(data):
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self._crc = crc

    def value(self) -> int:
        return self._crc ^ _MASK

    def digest(self) -> bytes:
        return self.value().to_bytes(8, "big")
