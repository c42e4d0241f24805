"""Property tests: no zTOC, however malformed, makes the reader raise anything but
LayerFormatError, and whatever it accepts reads back consistently (right sizes or errors).

Examples: ZTOC_FUZZ_EXAMPLES for the mutation test (default 300), a fifth of it for the
structured one (whose inputs cost more to generate). The long run used for the report:
    ZTOC_FUZZ_EXAMPLES=100000 .venv/bin/pytest -q -s tests/fusefs/test_ztoc_fuzz.py
prints how many inputs each test ran (and how many the reader accepted). Above 1000 examples
the suite's 300-second test timeout is lifted.
"""

from __future__ import annotations

import gzip
import io
import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs.formats import IndexLimits, LayerFormatError
from fusefs.formats.ztoc import ZtocLayer, build_ztoc, parse_ztoc
from fusefs.formats.ztoc.checkpoints import pack_checkpoints
from fusefs.index import EntryKind
from tests.fusefs.ztoc_support import FileSpec, encode_ztoc, read_ztoc_file
from tests.support.oci_image import TarBuilder

EXAMPLES = int(os.environ.get("ZTOC_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STRUCTURED = settings(FUZZ, max_examples=max(100, EXAMPLES // 5))
pytestmark = pytest.mark.timeout(0 if EXAMPLES > 1000 else 300)
LIMITS = IndexLimits(max_entries=200, max_depth=8, max_span_uncompressed=1 << 20)
RAN: Counter[str] = Counter()


def _sample() -> tuple[bytes, bytes]:
    rnd = random.Random(3)
    builder = TarBuilder().dir("d")
    for i in range(6):
        builder.file(f"d/f{i}", rnd.randbytes(3000) + b"abc" * rnd.randrange(2000, 9000))
    builder.symlink("d/l", "f0")
    tar = builder.tar()
    blob = gzip.compress(tar, mtime=0)
    return blob, build_ztoc(io.BytesIO(blob), span_size=16 * 1024).data


BLOB, ZTOC = _sample()
GOOD = parse_ztoc(ZTOC, blob_size=len(BLOB), limits=LIMITS)
# Offsets outside the checkpoint windows: where a mutation changes structure, not history.
_WINDOWS_START = ZTOC.find(pack_checkpoints(GOOD.spans.span_size, GOOD.spans.checkpoints)[:29])
_STRUCTURE = [
    *range(0, max(0, _WINDOWS_START) + 29),
    *range(
        _WINDOWS_START + len(pack_checkpoints(GOOD.spans.span_size, GOOD.spans.checkpoints)),
        len(ZTOC),
    ),
]


def _exercise(layer: ZtocLayer) -> None:
    """Read every file of an accepted zTOC: bytes of the promised size, or a format error."""
    index = layer.index
    for entry in range(index.entry_count):
        attr = index.attr(entry)
        if attr.kind != EntryKind.REG:
            continue
        try:
            data = read_ztoc_file(layer, BLOB, entry)
        except LayerFormatError:
            continue
        assert len(data) == attr.size


def _check(data: bytes, name: str) -> None:
    RAN[name] += 1
    try:
        layer = parse_ztoc(data, blob_size=len(BLOB), limits=LIMITS)
    except LayerFormatError:
        return
    RAN[name + " accepted"] += 1
    _exercise(layer)


mutation = st.tuples(
    st.sampled_from(["set", "flip", "cut", "insert", "delete"]),
    st.one_of(st.sampled_from(_STRUCTURE), st.integers(0, len(ZTOC) - 1)),
    st.integers(0, 255),
)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_ztoc(mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(ZTOC)
    for kind, position, value in mutations:
        if not data:
            break
        at = position % len(data)
        if kind == "set":
            data[at] = value
        elif kind == "flip":
            data[at] ^= 1 << (value % 8)
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([value]) * (value % 9 + 1)
        else:
            del data[at : at + value % 9 + 1]
    _check(bytes(data), "mutated")


fine_names = st.lists(st.sampled_from(["a", "b", "d", ".wh.a", "ü"]), min_size=1, max_size=3).map(
    "/".join
)
names = st.one_of(
    fine_names,
    fine_names,
    fine_names,
    st.sampled_from(
        ["a", "d/a", "./a", "d/", "/abs", "..", "a/../b", ".wh.a", "d/.wh..wh..opq", ""]
    ),
    st.text(alphabet="ad/.\x00wh", max_size=8),
)
file_specs = st.builds(
    FileSpec,
    name=names,
    type=st.sampled_from(
        ["reg", "reg", "reg", "reg", "dir", "dir", "symlink", "hardlink", "char", "fifo", "sock"]
    ),
    offset=st.one_of(st.integers(0, 120_000), st.integers(-(2**63), 2**63 - 1)),
    size=st.one_of(st.integers(0, 70_000), st.integers(-(2**63), 2**63 - 1)),
    linkname=names,
    mode=st.one_of(*[st.integers(0, 0o7777)] * 4, st.integers(-(2**63), 2**63 - 1)),
    mod_time=st.sampled_from(["2024-01-01T00:00:00Z"] * 4 + ["", "0001-01-01T00:00:00Z", "nope"]),
    devmajor=st.one_of(*[st.integers(0, 300)] * 4, st.just(-1)),
    pax=st.dictionaries(
        st.sampled_from(["SCHILY.xattr.user.a", "path", "SCHILY.xattr."]),
        st.binary(max_size=8),
        max_size=2,
    ),
)


# Real checkpoints of the sample, picked (repeated, reordered or dropped) by index. The test
# gets the indices, not the packed bytes: a failing example's repr stays small.
checkpoint_picks = st.lists(
    st.integers(0, len(GOOD.spans) - 1), min_size=1, max_size=len(GOOD.spans) + 1
)


ALL_SPANS = list(range(len(GOOD.spans)))


@STRUCTURED
@given(
    st.lists(file_specs, max_size=8),
    st.booleans(),
    st.one_of(st.just(ALL_SPANS), checkpoint_picks),
    st.sampled_from([16 * 1024, 16 * 1024, 0, -1]),
    st.one_of(st.none(), st.none(), st.integers(-1, 8)),
    st.one_of(st.just(len(BLOB)), st.just(len(BLOB)), st.integers(-1, 2 * len(BLOB))),
    st.one_of(st.just(GOOD.uncompressed_size), st.integers(-1, 200_000)),
    st.sampled_from([1, 1, 1, 0, 2, 9]),
    st.sampled_from(["real", "none", "zeros"]),
)
def test_structured_ztoc(
    files: list[FileSpec],
    tidy: bool,
    picks: list[int],
    span_size: int,
    max_span_id: int | None,
    compressed_size: int,
    uncompressed_size: int,
    algorithm: int,
    digests_kind: str,
) -> None:
    if tidy:
        # Lay the members out like a tar does, so more examples get past the file-table
        # checks and reach span inflation.
        position = 0
        for spec in files:
            spec.size = abs(spec.size) % 30_000
            spec.offset = position + 512
            position = spec.offset + spec.size + -(spec.offset + spec.size) % 512
    spans = len(picks) if max_span_id is None else max_span_id + 1
    digests = {
        "real": list(GOOD.span_digests or ()) if picks == ALL_SPANS else [],
        "none": [],
        "zeros": [f"sha256:{'0' * 64}"] * max(0, spans),
    }[digests_kind]
    checkpoints = pack_checkpoints(span_size, [GOOD.spans.checkpoints[i] for i in picks])
    data = encode_ztoc(
        files,
        checkpoints,
        compressed_size=compressed_size,
        uncompressed_size=uncompressed_size,
        max_span_id=spans - 1,
        span_digests=digests,
        algorithm=algorithm,
    )
    _check(data, "structured")


@pytest.fixture(scope="module", autouse=True)
def _report_inputs() -> object:
    yield
    inputs = sum(count for name, count in RAN.items() if not name.endswith("accepted"))
    print(f"\nztoc fuzz inputs: {dict(RAN)}, {inputs} inputs in all")
