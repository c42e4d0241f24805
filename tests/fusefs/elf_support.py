"""Small synthetic ELF files: any class and byte order, with an interpreter, DT_NEEDED names and a
RUNPATH, laid out as a linker would (one PT_LOAD mapping the file at ``BASE``)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

BASE = 0x10000
MACHINE_X86_64 = 62


def build_elf(
    *,
    bits: int = 64,
    byteorder: str = "<",
    interpreter: bytes | None = b"/lib64/ld-linux-x86-64.so.2",
    needed: Sequence[bytes] = (b"libc.so.6",),
    runpath: bytes | None = None,
    rpath_tag: bool = False,
    e_type: int = 3,
    machine: int = MACHINE_X86_64,
    padding: int = 0,
) -> bytes:
    """An ELF whose program headers, interpreter, .dynstr and dynamic segment are all real;
    ``padding`` bytes of zeros go before .dynstr (to push it past the first page)."""
    wide = bits == 64
    ehsize, phentsize = (64, 56) if wide else (52, 32)
    phnum = 3 if interpreter is not None else 2
    offset = ehsize + phnum * phentsize
    interp_offset = offset
    interp = (interpreter + b"\0") if interpreter is not None else b""
    offset += len(interp) + padding
    strtab = bytearray(b"\0")
    needed_offsets = []
    for name in needed:
        needed_offsets.append(len(strtab))
        strtab += name + b"\0"
    runpath_offset = len(strtab)
    if runpath is not None:
        strtab += runpath + b"\0"
    strtab_offset = offset
    offset += len(strtab)
    offset += -offset % 8
    dynamic_offset = offset
    entries = [(1, n) for n in needed_offsets]
    if runpath is not None:
        entries.append((15 if rpath_tag else 29, runpath_offset))
    entries += [(5, BASE + strtab_offset), (10, len(strtab)), (0, 0)]
    dyn = struct.Struct(byteorder + ("qQ" if wide else "iI"))
    dynamic = b"".join(dyn.pack(tag, value) for tag, value in entries)
    total = dynamic_offset + len(dynamic)

    def phdr(p_type: int, p_offset: int, size: int) -> bytes:
        if wide:
            return struct.pack(byteorder + "IIQQQQQQ", p_type, 4, p_offset, BASE + p_offset,
                               BASE + p_offset, size, size, 8)
        return struct.pack(byteorder + "IIIIIIII", p_type, p_offset, BASE + p_offset,
                           BASE + p_offset, size, size, 4, 4)

    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if byteorder == "<" else 2, 1]) + bytes(9)
    header_format = "16sHHIQQQIHHHHHH" if wide else "16sHHIIIIIHHHHHH"
    header = struct.pack(byteorder + header_format, ident, e_type, machine, 1, BASE, ehsize, 0,
                         0, ehsize, phentsize, phnum, 0, 0, 0)
    phdrs = phdr(1, 0, total)
    if interpreter is not None:
        phdrs += phdr(3, interp_offset, len(interp))
    phdrs += phdr(2, dynamic_offset, len(dynamic))
    out = bytearray(header + phdrs + interp + bytes(padding) + strtab)
    out += bytes(dynamic_offset - len(out))
    out += dynamic
    assert len(out) == total
    return bytes(out)
