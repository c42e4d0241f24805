"""sha256_raw accepts exactly ``sha256:`` and 64 lowercase hex digits, as the regex says."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given
from hypothesis import strategies as st

from fusefs.digest import sha256_raw
from tests.fuzzing import fuzz_settings

_REFERENCE = re.compile(r"sha256:([0-9a-f]{64})")
_GOOD = "sha256:" + hashlib.sha256(b"x").hexdigest()


def _reference(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    match = _REFERENCE.fullmatch(value)
    return bytes.fromhex(match.group(1)) if match is not None else None


def test_near_misses_are_refused() -> None:
    assert sha256_raw(_GOOD) == hashlib.sha256(b"x").digest()
    for bad in (
        _GOOD.upper(),
        "sha256:" + _GOOD[7:].upper(),
        _GOOD[:-2] + " 0",  # bytes.fromhex skips blanks
        _GOOD[:7] + " " + _GOOD[8:],
        _GOOD[:-1],
        _GOOD + "0",
        _GOOD + "\n",
        "SHA256:" + _GOOD[7:],
        "sha512:" + _GOOD[7:],
        _GOOD[:-1] + "g",
        _GOOD[:-1] + "\u0660",  # a non-ASCII digit
        None,
        5,
    ):
        assert sha256_raw(bad) is None, bad


@fuzz_settings(300)
@given(
    st.one_of(
        st.text(alphabet="0123456789abcdefABCDEF \t\n", min_size=60, max_size=66).map(
            lambda hex_part: "sha256:" + hex_part
        ),
        st.text(max_size=80),
        st.binary(min_size=32, max_size=32).map(lambda raw: "sha256:" + raw.hex()),
    )
)
def test_same_answer_as_the_regex(value: str) -> None:
    assert sha256_raw(value) == _reference(value)
