"""Facts about the seekable formats that fusefs and the snapshotter each hold for themselves
(neither may import the other on the CLI's path), checked to be the same facts."""

from __future__ import annotations

import pytest

from fusefs.digest import is_sha256_digest
from fusefs.formats import annotations as fusefs_keys
from fusefs.formats.annotations import parse_manifest_position
from registry.errors import UnsupportedDigestError
from registry.reference import validate_digest
from snapshotter import labels
from snapshotter.lazy_formats import valid_manifest_position, valid_sha256_digest

SHA = "sha256:" + "0123456789abcdef" * 4

# (value, valid): the zstd:chunked manifest-position rule of containers/storage.
POSITIONS = [
    ("100:50:200:1", True),
    ("0:1:0:1", True),  # the syntax allows it; the blob's size rules out offset 0 later
    ("9999999999999999999:1:1:1", True),
    ("100:50:200", False),  # c/storage's Sscanf needs all four fields
    ("1:2", False),
    ("100:50:200:2", False),  # manifest type 1 is the only one there is
    ("100:50:200:0", False),
    ("100:0:200:1", False),  # an empty TOC
    ("100:50:200:1:7", False),
    ("a:b:c:1", False),
    ("", False),
    ("100:50:200:", False),
    ("-1:50:200:1", False),
    ("+1:50:200:1", False),
    (" 1:50:200:1", False),
    ("1:50:200:1\n", False),
    ("\uff11:50:200:1", False),  # a fullwidth digit: str.isdigit and regex \d both take it
    ("12345678901234567890:1:1:1", False),  # more than a 64-bit offset
]

# (value, valid as a sha256 digest)
DIGESTS = [
    (SHA, True),
    (SHA.upper(), False),
    ("SHA256:" + SHA[7:], False),
    (SHA[:-1], False),
    (SHA + "0", False),
    (SHA + "\n", False),
    ("sha512:" + "0" * 128, False),
    ("sha256:" + "g" * 64, False),
    ("sha256:" + "\uff10" * 64, False),
    ("md5:abc", False),
    ("", False),
]


@pytest.mark.parametrize(("value", "valid"), POSITIONS)
def test_both_sides_read_a_manifest_position_alike(value: str, valid: bool) -> None:
    assert valid_manifest_position(value) is valid
    assert (parse_manifest_position(value) is not None) is valid


def test_a_manifest_position_parses_into_its_fields() -> None:
    position = parse_manifest_position("100:50:200:1")
    assert position is not None
    assert (position.offset, position.length, position.uncompressed_length) == (100, 50, 200)


@pytest.mark.parametrize(("value", "valid"), DIGESTS)
def test_every_side_reads_a_sha256_digest_alike(value: str, valid: bool) -> None:
    assert valid_sha256_digest(value) is valid
    assert is_sha256_digest(value) is valid
    # The registry also verifies sha384 and sha512; for sha256 it applies the same rule.
    if value.startswith("sha256:") or not valid:
        try:
            validate_digest(value)
            registry_valid = True
        except UnsupportedDigestError:
            registry_valid = False
        assert registry_valid is (valid or value.startswith("sha512:"))


def test_the_shared_annotation_keys_are_equal_on_both_sides() -> None:
    pairs = {
        labels.ESTARGZ_TOC_DIGEST: fusefs_keys.ESTARGZ_TOC_DIGEST,
        labels.ESTARGZ_UNCOMPRESSED_SIZE: fusefs_keys.ESTARGZ_UNCOMPRESSED_SIZE,
        labels.ZSTD_CHUNKED_CHECKSUM: fusefs_keys.ZSTD_MANIFEST_CHECKSUM,
        labels.ZSTD_CHUNKED_POSITION: fusefs_keys.ZSTD_MANIFEST_POSITION,
        labels.ZSTD_CHUNKED_TARSPLIT_POSITION: fusefs_keys.ZSTD_TARSPLIT_POSITION,
        labels.LEGACY_ZSTD_CHUNKED_CHECKSUM: fusefs_keys.LEGACY_ZSTD_MANIFEST_CHECKSUM,
        labels.LEGACY_ZSTD_CHUNKED_POSITION: fusefs_keys.LEGACY_ZSTD_MANIFEST_POSITION,
    }
    assert all(ours == theirs for ours, theirs in pairs.items()), pairs
    # Every fusefs key is covered above, so a key added there cannot be forgotten here.
    fusefs_values = {
        value for name, value in vars(fusefs_keys).items()
        if name.isupper() and isinstance(value, str)
    }
    assert fusefs_values == set(pairs.values())


def test_the_snapshotter_forwards_every_zstd_chunked_and_estargz_key() -> None:
    forwarded = [
        key for key in vars(fusefs_keys).values()
        if isinstance(key, str) and key.startswith(labels.FORWARDED_ANNOTATION_PREFIXES)
    ]
    assert len(forwarded) == 6  # all but the toc.digest, which containerd passes itself
