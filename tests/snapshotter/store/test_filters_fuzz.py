"""Fuzzing List filters built from their grammar: only InvalidArgumentError escapes, whatever
parses can be evaluated, and a written filter parses back to the selectors it was built from."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from snapshotter.errors import InvalidArgumentError
from snapshotter.model import Kind, SnapshotInfo
from snapshotter.store.filters import Selector, matcher, parse_filter
from tests.fuzzing import fuzz_settings
from tests.snapshotter.store.test_filters import go_quote

SNAPSHOTS = [
    SnapshotInfo(name="n", parent="", kind=Kind.ACTIVE, created_ns=1, updated_ns=1, labels={}),
    SnapshotInfo(name="a.b", parent="p", kind=Kind.COMMITTED, created_ns=1, updated_ns=1,
                 labels={"x": "1", "a.b/c": "é\n", "": ""}),
]  # fmt: skip
identifiers = st.one_of(
    st.sampled_from(["name", "parent", "kind", "labels", "x", "a-b_0"]),
    st.from_regex(r"[A-Za-z0-9_\-]{1,6}", fullmatch=True),
)
keys = st.one_of(identifiers, st.text(max_size=8))
values = st.text(max_size=10)
# Regular expressions from RE2's syntax, valid or not, and a few that are costly elsewhere.
regexps = st.one_of(
    st.lists(st.sampled_from(["a", ".", "*", "+", "?", "(", ")", "[", "]", "^", "$", "|", "\\d",
                              "{2}", "{2,}", "{1,1000}", "{99999999}", "[:alpha:]", "\\Q", "\\E",
                              "\\p{Greek}", "\\x{41}", "(?i)", "(?P<n>", "\\", "é", "\\z"]),
             max_size=8).map("".join),
    st.sampled_from(["(a*)*b", "(a|a)*$", "(x+x+)+y", "a{1000}{1000}", "((a{100}){100}){100}"]),
)  # fmt: skip


def field_text(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else (
        go_quote(key))  # fmt: skip


@st.composite
def selectors(draw: st.DrawFn) -> tuple[str, Selector]:
    path = tuple(draw(st.lists(keys, min_size=1, max_size=3)))
    operator = draw(st.sampled_from([None, "==", "!=", "~="]))
    written = ".".join(field_text(key) for key in path)
    if operator is None:
        return written, Selector(path, None)
    if operator == "~=":
        value = draw(regexps)
        quoted = draw(st.sampled_from(["/", "|", '"']))
        text = (
            go_quote(value)
            if quoted == '"'
            else quoted + value.replace(quoted, "\\" + quoted) + quoted
        )
    else:
        value = draw(values)
        text = go_quote(value)
    space = draw(st.sampled_from(["", " ", "\t"]))
    return f"{written}{space}{operator}{space}{text}", Selector(path, operator, value)


filters = st.lists(selectors(), min_size=1, max_size=4)


def check_any_result(text: str) -> None:
    try:
        parsed = parse_filter(text)
    except InvalidArgumentError:
        return
    match = matcher([parsed])
    for snapshot in SNAPSHOTS:
        assert match(snapshot) in (True, False)


@fuzz_settings(400)
@given(filters)
def test_written_filters_parse_back_to_their_selectors(
    built: list[tuple[str, Selector]],
) -> None:
    text = ",".join(written for written, _ in built)
    try:
        parsed = parse_filter(text)
    except InvalidArgumentError as exc:
        # Only a regular expression RE2 or Go refuses, or an alternative quote inside the
        # regexp that ends it early, may fail a filter written from the grammar.
        assert "regular expression" in str(exc) or "expected ',' or the end" in str(exc)
        return
    wanted = [selector for _, selector in built]
    if all(s.operator != "~=" or ("/" not in s.value and "|" not in s.value) for s in wanted):
        assert [(s.fieldpath, s.operator, s.value) for s in parsed] == [
            (s.fieldpath, s.operator, s.value) for s in wanted
        ]
    check_any_result(text)


@fuzz_settings(400)
@given(
    filters.map(lambda built: ",".join(written for written, _ in built)).flatmap(
        lambda text: st.tuples(
            st.integers(0, len(text)), st.text("\"'\\/|=!~,. .xuU0o7", max_size=3)
        ).map(lambda cut: text[: cut[0]] + cut[1] + text[cut[0] + 1 :])
    )
)
def test_mutated_filters_only_raise_invalid_argument(text: str) -> None:
    check_any_result(text)
