"""containerd's filter language for snapshot List (pure).

    filter   := selector ( "," selector )*          all selectors must match (AND)
    selector := fieldpath [ operator value ]         no operator: the field is present
    fieldpath:= field ( "." field )*
    field    := identifier | quoted
    operator := "==" | "!=" | "~="                  ~= is a regular expression search (RE2)
    value    := quoted | characters up to the next "," or white space
    quoted   := Go string in "..." (also '...'), or /.../ or |...| after ~=

Several filter strings passed to List are alternatives (OR). Snapshot fields are ``name``,
``parent``, ``kind`` (active|view|committed) and ``labels.<key>``, where keys holding dots or
slashes are quoted: ``labels."containerd.io/snapshot.ref"==sha256:...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapshotter.errors import InvalidArgumentError
from snapshotter.model import SnapshotInfo
from snapshotter.store.filter_regexp import FilterRegexp, compile_filter_regexp

# containerd's scanner takes any run of letters, digits, "_" and "-" as a field name.
_IDENT = re.compile(r"[A-Za-z0-9_\-]+")
_OPERATORS = ("==", "!=", "~=")
# Go's strconv escapes: containerd unquotes filter strings with Go's rules, and %q emits \a \b.
_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"', "'": "'",
}
_OCTAL = "01234567"


@dataclass(frozen=True, slots=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None: presence test
    value: str = ""
    pattern: FilterRegexp | None = None


Filter = tuple[Selector, ...]


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"invalid filter {self.text!r} at position {self.pos}: {message}"
        )

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_spaces()
        return self.pos >= len(self.text)

    def peek(self, token: str) -> bool:
        self.skip_spaces()
        return self.text.startswith(token, self.pos)

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char == "\\":
                if self.pos >= len(self.text):
                    break
                esc = self.text[self.pos]
                self.pos += 1
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                elif esc in _OCTAL:
                    # Go: exactly three octal digits, at most \377.
                    digits = self.text[self.pos - 1 : self.pos + 2]
                    if len(digits) != 3 or not all(c in _OCTAL for c in digits):
                        raise self.error("bad octal escape")
                    if int(digits, 8) > 0o377:
                        raise self.error(f"octal escape \\{digits} is over \\377")
                    out.append(chr(int(digits, 8)))
                    self.pos += 2
                elif esc in "xuU":
                    width = {"x": 2, "u": 4, "U": 8}[esc]
                    digits = self.text[self.pos : self.pos + width]
                    hexdigits = "0123456789abcdefABCDEF"
                    if len(digits) != width or not all(c in hexdigits for c in digits):
                        raise self.error(f"bad \\{esc} escape")
                    code = int(digits, 16)
                    if code > 0x10FFFF:
                        raise self.error(f"\\{esc}{digits} is not a unicode code point")
                    out.append(chr(code))
                    self.pos += width
                else:
                    raise self.error(f"unknown escape \\{esc}")
            else:
                out.append(char)
        raise self.error("unterminated quoted string")

    def alt_quoted(self) -> str:
        """A ``~=`` value quoted with ``/`` or ``|``, containerd's regexp quotes. Only
        backslash-quote is unescaped, so regexp escapes such as ``\\d`` pass through."""
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char == "\\" and self.text.startswith(quote, self.pos):
                out.append(quote)
                self.pos += 1
            else:
                out.append(char)
        raise self.error("unterminated quoted regular expression")

    def field(self) -> str:
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            return self.quoted()
        match = _IDENT.match(self.text, self.pos)
        if not match:
            raise self.error("expected a field name")
        self.pos = match.end()
        return match.group()

    def value(self, regexp: bool = False) -> str:
        self.skip_spaces()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            return self.quoted()
        if regexp and self.pos < len(self.text) and self.text[self.pos] in "/|":
            return self.alt_quoted()
        # Unquoted values end at a comma or white space, as containerd's value := [^\s,]+.
        end = self.pos
        while end < len(self.text) and self.text[end] != "," and not self.text[end].isspace():
            end += 1
        raw = self.text[self.pos : end]
        if not raw:
            raise self.error("expected a value")
        self.pos = end
        return raw


def parse_filter(text: str) -> Filter:
    """Parse one filter string of selectors joined by commas; raise InvalidArgumentError."""
    scanner = _Scanner(text)
    selectors: list[Selector] = []
    if not text:
        return ()  # only the empty string matches everything; "  " is an error, as in containerd
    while True:
        path = [scanner.field()]
        while scanner.peek(".") and not scanner.peek(".."):
            scanner.pos += 1
            path.append(scanner.field())
        operator = next((op for op in _OPERATORS if scanner.peek(op)), None)
        if operator is None:
            selectors.append(Selector(tuple(path), None))
        else:
            scanner.pos += len(operator)
            value = scanner.value(regexp=operator == "~=")
            pattern = None
            if operator == "~=":
                try:
                    pattern = compile_filter_regexp(value)
                except InvalidArgumentError as exc:
                    raise scanner.error(f"bad regular expression: {exc}") from None
            selectors.append(Selector(tuple(path), operator, value, pattern))
        if scanner.at_end():
            return tuple(selectors)
        if not scanner.peek(","):
            raise scanner.error("expected ',' or the end of the filter")
        scanner.pos += 1


def parse_filters(texts: Sequence[str]) -> list[Filter]:
    return [parse_filter(text) for text in texts]


def _field(info: SnapshotInfo, path: tuple[str, ...]) -> str | None:
    """The field's value, or None when absent, as containerd's snapshot filter adaptor has it.

    ``name``, ``parent`` and ``kind`` are always present, and an empty parent is the value "".
    ``labels.<key>`` is present when the label is set.
    """
    head, rest = path[0], path[1:]
    if head == "labels":
        if not rest:
            return None
        return info.labels.get(".".join(rest))
    if head == "name":
        return info.name
    if head == "parent":
        return info.parent
    if head == "kind":
        return info.kind.label
    return None


def _selector_matches(selector: Selector, info: SnapshotInfo) -> bool:
    value = _field(info, selector.fieldpath)
    if selector.operator is None:
        return value is not None
    if selector.operator == "==":
        return value is not None and value == selector.value
    # As in containerd, "!=" and "~=" compare an absent field as the empty string: so
    # ``labels.x!=y`` is true where x is unset, and ``parent!=""`` is false without a parent.
    if selector.operator == "!=":
        return (value or "") != selector.value
    assert selector.pattern is not None
    return selector.pattern.search(value or "")


def matcher(filters: Sequence[Filter]) -> Callable[[SnapshotInfo], bool]:
    """A predicate that is true when any filter (OR) has all its selectors (AND) matching."""
    active = [f for f in filters if f]
    if len(active) < len(filters) or not filters:
        return lambda _info: True  # an empty filter string matches everything

    def matches(info: SnapshotInfo) -> bool:
        return any(all(_selector_matches(s, info) for s in f) for f in active)

    return matches
