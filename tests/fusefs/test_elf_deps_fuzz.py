"""Fuzzing the ELF dependency parser: any bytes give None or bounded answers, never an
exception, and mutated real layouts keep the interpreter and names within the file."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fusefs.elf_deps import ElfDeps, elf_deps, parse_header
from tests.fusefs.elf_support import build_elf
from tests.fuzzing import fuzz_settings

names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
elves = st.builds(
    build_elf,
    bits=st.sampled_from([32, 64]),
    byteorder=st.sampled_from(["<", ">"]),
    interpreter=st.one_of(st.none(), names.map(lambda n: b"/" + n)),
    needed=st.lists(names, max_size=5),
    runpath=st.one_of(st.none(), names),
    padding=st.integers(0, 5000),
)
flips = st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=6)


def _bounded(deps: ElfDeps | None, data: bytes) -> None:
    if deps is None:
        return
    assert deps.interpreter is None or deps.interpreter in data
    assert len(deps.needed) <= 256
    for name in deps.needed:
        assert 0 < len(name) <= 255 and b"\0" not in name and name in data


@fuzz_settings(300)
@given(data=st.binary(max_size=3000))
def test_random_bytes_never_raise(data: bytes) -> None:
    _bounded(elf_deps(data), data)
    _bounded(elf_deps(b"\x7fELF" + data), b"\x7fELF" + data)


@fuzz_settings(300)
@given(elf=elves, flips=flips, cut=st.integers(0, 20_000))
def test_mutated_elves_never_raise(elf: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(elf)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    mutated = bytes(data[:cut] if cut < len(data) else data)
    parse_header(mutated)
    _bounded(elf_deps(mutated), mutated)


@fuzz_settings(200)
@given(
    bits=st.sampled_from([32, 64]),
    byteorder=st.sampled_from(["<", ">"]),
    interpreter=names.map(lambda n: b"/" + n),
    needed=st.lists(names, max_size=5),
)
def test_unmutated_elves_parse_back(
    bits: int, byteorder: str, interpreter: bytes, needed: list[bytes]
) -> None:
    data = build_elf(bits=bits, byteorder=byteorder, interpreter=interpreter, needed=needed)
    deps = elf_deps(data)
    assert deps is not None
    assert deps.interpreter == interpreter and list(deps.needed) == needed
