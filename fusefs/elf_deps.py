"""What an ELF file needs to run, read from a few of its bytes: the program interpreter
(``PT_INTERP``), the ``DT_NEEDED`` libraries and the ``DT_RUNPATH``/``DT_RPATH`` search path.

Pure parsing of untrusted bytes (a layer is anyone's file): every size and count is bounded
before it is used, and malformed input gives None or an empty answer, never an exception. 32
and 64-bit, both byte orders. Nothing here reads a file: ``ElfHeader`` names the byte ranges
the next step needs (``interp_range``, ``dynamic_range``, then ``strtab_range``), and the
caller reads them however it reads (``fusefs.exec_prefetch`` through the chunk fetcher).
``elf_deps`` puts the steps together over one buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

Read = Callable[[int, int], bytes]  # (file offset, size) -> the bytes there, short at the end

ELF_MAGIC = b"\x7fELF"
HEAD_BYTES = 4096  # the first page: the ELF header and, in practice, the program headers

_ET_EXEC, _ET_DYN = 2, 3
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29

# Bounds: far above any real binary, low enough that a hostile file costs little.
_MAX_PHNUM = 128
_MAX_PATH = 4096  # PATH_MAX: longest interpreter path and RUNPATH string
_MAX_DYNAMIC = 64 * 1024  # bytes of the dynamic segment read (4096 entries of 16 bytes)
_MAX_NEEDED = 256
_MAX_STRTAB = 1 << 20  # bytes of .dynstr read
_MAX_NAME = 255  # a DT_NEEDED name is a file name, or a short path

# (class, data) of e_ident -> (struct prefix, header, program header, dynamic entry formats)
_FORMATS = {
    (1, 1): ("<", "16sHHIIIIIHHHHHH", "IIIIIIII", "iI"),
    (1, 2): (">", "16sHHIIIIIHHHHHH", "IIIIIIII", "iI"),
    (2, 1): ("<", "16sHHIQQQIHHHHHH", "IIQQQQQQ", "qQ"),
    (2, 2): (">", "16sHHIQQQIHHHHHH", "IIQQQQQQ", "qQ"),
}


@dataclass(frozen=True, slots=True)
class _Load:
    vaddr: int
    offset: int
    filesz: int


@dataclass(frozen=True, slots=True)
class ElfHeader:
    """What the program headers say: where the interpreter path and the dynamic segment lie."""

    bits: int  # 32 or 64
    byteorder: str  # "<" or ">"
    machine: int  # e_machine, to pick the multiarch library directory
    dynamic_entry: str  # struct format of one dynamic entry (tag, value)
    interp_range: tuple[int, int] | None  # (file offset, size) of the PT_INTERP path
    dynamic_range: tuple[int, int] | None  # (file offset, size) of PT_DYNAMIC, size bounded
    loads: tuple[_Load, ...]

    def file_offset(self, vaddr: int, size: int) -> int | None:
        """The file offset of ``size`` bytes at ``vaddr``, if one PT_LOAD maps all of them."""
        for load in self.loads:
            if load.vaddr <= vaddr and vaddr + size <= load.vaddr + load.filesz:
                return load.offset + (vaddr - load.vaddr)
        return None


@dataclass(frozen=True, slots=True)
class DynamicInfo:
    """The dynamic segment's string references, as offsets into ``.dynstr``."""

    needed: tuple[int, ...]
    runpath: int | None  # DT_RUNPATH, else DT_RPATH
    strtab_range: tuple[int, int] | None  # (file offset, size) of .dynstr, size bounded


@dataclass(frozen=True, slots=True)
class ElfDeps:
    interpreter: bytes | None  # such as b"/lib64/ld-linux-x86-64.so.2"
    needed: tuple[bytes, ...]  # such as (b"libc.so.6",)
    runpath: tuple[bytes, ...]  # search directories, $ORIGIN not expanded
    machine: int


def parse_header(head: bytes) -> ElfHeader | None:
    """The program headers of an executable or shared object from its first bytes (the header
    and the program header table must be in ``head``), or None if it is not one."""
    try:
        return _parse_header(head)
    except struct.error:
        return None


def _parse_header(head: bytes) -> ElfHeader | None:
    if len(head) < 20 or head[:4] != ELF_MAGIC:
        return None
    formats = _FORMATS.get((head[4], head[5]))
    if formats is None:
        return None
    order, header_format, phdr_format, dynamic_format = formats
    fields = struct.unpack_from(order + header_format, head)
    e_type, machine, phoff = fields[1], fields[2], fields[5]
    phentsize, phnum = fields[9], fields[10]
    phdr = struct.Struct(order + phdr_format)
    if e_type not in (_ET_EXEC, _ET_DYN) or phentsize != phdr.size or not 0 < phnum <= _MAX_PHNUM:
        return None
    if phoff + phnum * phdr.size > len(head):
        return None
    bits = 32 if head[4] == 1 else 64
    interp = dynamic = None
    loads: list[_Load] = []
    for number in range(phnum):
        values = phdr.unpack_from(head, phoff + number * phdr.size)
        if bits == 64:
            p_type, _, offset, vaddr, _, filesz, _, _ = values
        else:
            p_type, offset, vaddr, _, filesz, _, _, _ = values
        if p_type == _PT_INTERP and interp is None and 1 < filesz <= _MAX_PATH:
            interp = (offset, filesz)
        elif p_type == _PT_DYNAMIC and dynamic is None and filesz > 0:
            dynamic = (offset, min(filesz, _MAX_DYNAMIC))
        elif p_type == _PT_LOAD and len(loads) < _MAX_PHNUM:
            loads.append(_Load(vaddr, offset, filesz))
    return ElfHeader(
        bits, order, machine, order + dynamic_format, interp, dynamic, tuple(loads)
    )


def parse_interpreter(data: bytes) -> bytes | None:
    """The interpreter path from the ``interp_range`` bytes: NUL-terminated, absolute."""
    path, nul, _ = data.partition(b"\0")
    if not nul or not path.startswith(b"/") or len(path) > _MAX_PATH:
        return None
    return path


def parse_dynamic(header: ElfHeader, data: bytes) -> DynamicInfo:
    """The ``dynamic_range`` bytes' DT_NEEDED, DT_RUNPATH/DT_RPATH and where .dynstr lies."""
    entry = struct.Struct(header.dynamic_entry)
    needed: list[int] = []
    runpath = rpath = strtab = strsz = None
    for position in range(0, min(len(data), _MAX_DYNAMIC) - entry.size + 1, entry.size):
        tag, value = entry.unpack_from(data, position)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED and len(needed) < _MAX_NEEDED:
            needed.append(value)
        elif tag == _DT_RUNPATH:
            runpath = value
        elif tag == _DT_RPATH:
            rpath = value
        elif tag == _DT_STRTAB:
            strtab = value
        elif tag == _DT_STRSZ:
            strsz = value
    strtab_range = None
    if strtab is not None and strsz is not None and strsz > 0:
        size = min(strsz, _MAX_STRTAB)
        offset = header.file_offset(strtab, size)
        if offset is not None:
            strtab_range = (offset, size)
    return DynamicInfo(tuple(needed), runpath if runpath is not None else rpath, strtab_range)


def string_at(strtab: bytes, offset: int, limit: int = _MAX_NAME) -> bytes | None:
    """The NUL-terminated string at ``offset`` of ``strtab``, if non-empty and short enough."""
    if not 0 <= offset < len(strtab):
        return None
    end = strtab.find(b"\0", offset, offset + limit + 1)
    if end <= offset:
        return None
    return strtab[offset:end]


def resolve_strings(
    dynamic: DynamicInfo, strtab: bytes
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(DT_NEEDED names, RUNPATH directories) from the ``strtab_range`` bytes."""
    needed = tuple(
        name for name in (string_at(strtab, offset) for offset in dynamic.needed) if name
    )
    runpath: tuple[bytes, ...] = ()
    if dynamic.runpath is not None:
        joined = string_at(strtab, dynamic.runpath, _MAX_PATH)
        if joined:
            runpath = tuple(part for part in joined.split(b":") if part)
    return needed, runpath


def elf_deps(data: bytes) -> ElfDeps | None:
    """Everything above over one buffer holding the file, or as much of it as was read: what
    lies beyond the buffer is simply not found. None for anything but an ELF executable or
    shared object."""
    header = parse_header(data[:HEAD_BYTES])
    if header is None:
        return None
    return deps_from(header, lambda offset, size: data[offset : offset + size])


def deps_from(header: ElfHeader, read: Read) -> ElfDeps:
    """The dependencies of the file ``header`` came from, reading its ranges with ``read``."""
    interpreter = None
    if header.interp_range is not None:
        interpreter = parse_interpreter(read(*header.interp_range))
    needed: tuple[bytes, ...] = ()
    runpath: tuple[bytes, ...] = ()
    if header.dynamic_range is not None:
        dynamic = parse_dynamic(header, read(*header.dynamic_range))
        if dynamic.strtab_range is not None:
            needed, runpath = resolve_strings(dynamic, read(*dynamic.strtab_range))
    return ElfDeps(interpreter, needed, runpath, header.machine)

