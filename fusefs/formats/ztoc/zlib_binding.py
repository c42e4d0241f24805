"""A minimal ctypes binding to the system zlib for what Python's ``zlib`` module lacks.

Two things need it: ``inflatePrime`` (start inflating at a bit offset inside a byte) and
``inflate(Z_BLOCK)`` with ``data_type`` (stop at each deflate block boundary and learn how
many bits of the last byte are still unread). Everything else stays with ``zlib``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5

# data_type bits that inflate() sets: 128 at the end of a block (or just after a header),
# 64 when that block is the last one, and the low 3 bits count unread bits of the last byte.
END_OF_BLOCK = 128
LAST_BLOCK = 64
UNUSED_BITS = 7


class ZlibError(Exception):
    """zlib refused the stream or the binding could not be loaded."""


class _ZStream(ctypes.Structure):
    _fields_ = (
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    )


@functools.cache
def _libz() -> Any:
    name = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise ZlibError(f"cannot load the system zlib ({name}): {exc}") from exc
    stream = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = (stream, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    lib.inflateReset2.argtypes = (stream, ctypes.c_int)
    lib.inflate.argtypes = (stream, ctypes.c_int)
    lib.inflateEnd.argtypes = (stream,)
    lib.inflatePrime.argtypes = (stream, ctypes.c_int, ctypes.c_int)
    lib.inflateSetDictionary.argtypes = (stream, ctypes.c_char_p, ctypes.c_uint)
    return lib


class Inflater:
    """One zlib inflate stream. ``wbits`` as for ``zlib.decompressobj`` (-15 raw, 31 gzip).

    The caller owns the input: ``feed`` keeps a reference to it until it is consumed.
    """

    def __init__(self, wbits: int) -> None:
        self._open = False  # until inflateInit2 succeeds: __del__ must not call inflateEnd
        self._lib = _libz()
        self._stream = _ZStream()
        self._input: ctypes.Array[ctypes.c_char] | None = None
        self._input_base = 0
        self._input_size = 0
        version = self._lib.zlibVersion()
        code = self._lib.inflateInit2_(
            ctypes.byref(self._stream), wbits, version, ctypes.sizeof(_ZStream)
        )
        if code != Z_OK:
            raise ZlibError(f"inflateInit2 failed: {code}")
        self._open = True

    def close(self) -> None:
        if self._open:
            self._lib.inflateEnd(ctypes.byref(self._stream))
            self._open = False

    def __enter__(self) -> Inflater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def reset(self, wbits: int) -> None:
        code = self._lib.inflateReset2(ctypes.byref(self._stream), wbits)
        if code != Z_OK:
            raise ZlibError(f"inflateReset2 failed: {code}")

    def prime(self, bits: int, value: int) -> None:
        code = self._lib.inflatePrime(ctypes.byref(self._stream), bits, value)
        if code != Z_OK:
            raise ZlibError(f"inflatePrime failed: {code}")

    def set_dictionary(self, window: bytes) -> None:
        code = self._lib.inflateSetDictionary(ctypes.byref(self._stream), window, len(window))
        if code != Z_OK:
            raise ZlibError(f"inflateSetDictionary failed: {code}")

    def feed(self, data: bytes) -> None:
        """Make ``data`` the input (replacing whatever was left of the previous one)."""
        self._input = ctypes.create_string_buffer(data, len(data))
        self._input_base = ctypes.addressof(self._input)
        self._input_size = len(data)
        self._stream.next_in = self._input_base
        self._stream.avail_in = len(data)

    @property
    def avail_in(self) -> int:
        return int(self._stream.avail_in)

    @property
    def consumed(self) -> int:
        """Bytes of the current input consumed so far."""
        return self._input_size - int(self._stream.avail_in)

    @property
    def data_type(self) -> int:
        return int(self._stream.data_type)

    def inflate_into(
        self, out: ctypes.Array[ctypes.c_char], start: int, flush: int, room: int | None = None
    ) -> tuple[int, int]:
        """Inflate into at most ``room`` bytes of ``out[start:]`` (all of it by default);
        returns (zlib code, bytes written)."""
        room = len(out) - start if room is None else min(room, len(out) - start)
        self._stream.next_out = ctypes.addressof(out) + start
        self._stream.avail_out = room
        code = int(self._lib.inflate(ctypes.byref(self._stream), flush))
        if code not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            message = self._stream.msg.decode(errors="replace") if self._stream.msg else ""
            raise ZlibError(f"inflate failed: {code} {message}".rstrip())
        return code, room - int(self._stream.avail_out)
