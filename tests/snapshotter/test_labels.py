"""containerd's label size rule (pure): key and value together at most 4096 bytes of UTF-8."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.errors import InvalidArgumentError
from snapshotter.labels import MAX_LABEL_BYTES, validate_labels
from tests.fuzzing import fuzz_settings

KEY = "containerd.io/snapshot/cri.image-layers"


def test_exactly_4096_bytes_is_accepted() -> None:
    labels = {KEY: "x" * (MAX_LABEL_BYTES - len(KEY))}
    assert validate_labels(labels) == labels


def test_4097_bytes_is_rejected_naming_the_key_and_sizes() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_labels({"ok": "1", KEY: "x" * (MAX_LABEL_BYTES + 1 - len(KEY))})
    assert KEY in str(info.value)
    assert "4097" in str(info.value) and "4096" in str(info.value)


def test_size_is_counted_in_utf8_bytes() -> None:
    fits_in_chars = {"k": "é" * 3000}  # 3001 characters, 6001 bytes
    with pytest.raises(InvalidArgumentError):
        validate_labels(fits_in_chars)


def test_long_keys_are_shortened_in_the_message() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_labels({"k" * 5000: ""})
    assert len(str(info.value)) < 200


def test_empty_key_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError):
        validate_labels({"": "v"})


def test_values_are_kept_verbatim_in_a_new_dict() -> None:
    labels = {"containerd.io/gc.root": "2026-01-01T00:00:00Z", "a/b c": "\n\x00é", "e": ""}
    checked = validate_labels(labels)
    assert checked == labels
    assert checked is not labels


# Values near the limit, in one- and two-byte characters (built, not drawn char by char).
VALUES = st.text(max_size=30) | st.builds(
    lambda char, n: char * n, st.sampled_from(["x", "é"]), st.integers(1990, 4100))


@fuzz_settings(300)
@given(st.dictionaries(st.text(max_size=30), VALUES, max_size=4))
def test_accepts_exactly_what_fits(labels: dict[str, str]) -> None:
    fits = all(k and len(k.encode()) + len(v.encode()) <= MAX_LABEL_BYTES
               for k, v in labels.items())
    if fits:
        assert validate_labels(labels) == labels
    else:
        with pytest.raises(InvalidArgumentError):
            validate_labels(labels)
