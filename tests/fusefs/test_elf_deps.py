"""ELF dependencies: real binaries of the host, synthetic ones of every class and byte order,
and hostile bytes (tests/fusefs/test_elf_deps_fuzz.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fusefs.elf_deps import HEAD_BYTES, elf_deps, parse_header
from tests.fusefs.elf_support import MACHINE_X86_64, build_elf


def _readelf_needed(path: Path) -> list[bytes]:
    out = subprocess.run(["readelf", "-dW", str(path)], capture_output=True, check=True).stdout
    return [line.rsplit(b"[", 1)[1].rstrip(b"]") for line in out.splitlines()
            if b"(NEEDED)" in line]


@pytest.mark.parametrize("name", ["/bin/ls", "/usr/bin/python3", "/bin/bash"])
def test_host_binaries_match_readelf(name: str) -> None:
    path = Path(name).resolve()
    if not path.exists() or shutil.which("readelf") is None:
        pytest.skip(f"no {name} or readelf on this host")
    deps = elf_deps(path.read_bytes())
    assert deps is not None
    assert deps.interpreter is not None and deps.interpreter.startswith(b"/lib")
    assert b"ld-linux" in deps.interpreter
    assert list(deps.needed) == _readelf_needed(path)
    assert b"libc.so.6" in deps.needed
    assert deps.machine == MACHINE_X86_64


def test_static_busybox_needs_nothing() -> None:
    path = Path("/bin/busybox")
    if not path.exists():
        pytest.skip("busybox-static is not installed")
    deps = elf_deps(path.read_bytes())
    assert deps is not None
    assert deps.interpreter is None and deps.needed == ()


def test_host_libc_is_a_shared_object_needing_the_loader() -> None:
    path = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if not path.exists():
        pytest.skip("no x86_64 libc")
    deps = elf_deps(path.read_bytes())
    assert deps is not None and deps.needed == (b"ld-linux-x86-64.so.2",)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_synthetic_elves_of_every_class_and_byte_order(bits: int, byteorder: str) -> None:
    data = build_elf(
        bits=bits,
        byteorder=byteorder,
        interpreter=b"/lib/ld-musl-armhf.so.1",
        needed=[b"libz.so.1", b"libc.so"],
        runpath=b"$ORIGIN/../lib:/opt/app/lib",
        machine=40,
    )
    deps = elf_deps(data)
    assert deps is not None
    assert deps.interpreter == b"/lib/ld-musl-armhf.so.1"
    assert deps.needed == (b"libz.so.1", b"libc.so")
    assert deps.runpath == (b"$ORIGIN/../lib", b"/opt/app/lib")
    assert deps.machine == 40


def test_rpath_counts_when_there_is_no_runpath() -> None:
    deps = elf_deps(build_elf(runpath=b"/opt/lib", rpath_tag=True))
    assert deps is not None and deps.runpath == (b"/opt/lib",)


def test_strings_beyond_the_bytes_given_are_simply_not_found() -> None:
    data = build_elf(padding=2 * HEAD_BYTES)
    full = elf_deps(data)
    assert full is not None and full.needed == (b"libc.so.6",)
    head = elf_deps(data[:HEAD_BYTES])
    assert head is not None
    assert head.interpreter == b"/lib64/ld-linux-x86-64.so.2" and head.needed == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x7fELF",
        b"\x7fELF" + bytes(60),
        b"#!/bin/sh\necho hi\n",
        build_elf(e_type=1),  # a relocatable object: never executed
        build_elf()[:100],  # program headers cut off
        b"\x7fELF\x03\x01" + bytes(100),  # no such class
    ],
)
def test_not_an_executable_is_none(data: bytes) -> None:
    assert elf_deps(data) is None
    assert parse_header(data) is None


def test_a_huge_program_header_count_is_refused() -> None:
    data = bytearray(build_elf())
    data[56:58] = (60000).to_bytes(2, "little")  # e_phnum of a 64-bit header
    assert parse_header(bytes(data)) is None
