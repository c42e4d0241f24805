r"""The regular expressions of ``~=`` filters, with the RE2 semantics of containerd's Go regexp.

RE2 matches in time linear in the text, so a hostile pattern such as ``(\w|\w)*!`` cannot make
List backtrack for hours with the interpreter lock held. Its syntax is Go's, not Python's: no
backreferences or lookaround, ``\z`` instead of ``\Z``, and ``\d``, ``\w`` and ``\b`` are ASCII.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import re2

from snapshotter.errors import InvalidArgumentError

# A repeat count as Go's parser reads it after "{": digits without a leading zero.
_REPEAT = re.compile(r"\{(0|[1-9][0-9]*)(?:,(0|[1-9][0-9]*)?)?\}")
# Go refuses a count of eight digits or more; RE2 in C++ reads such a brace as literal text.
_MAX_COUNT_DIGITS = 7


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is the client's error, reported to the client
    return options


_OPTIONS = _options()


def _has_oversized_repeat(pattern: str) -> bool:
    """True when a repeat count outside classes and escapes has too many digits for Go."""
    pos = 0
    in_class = False
    while pos < len(pattern):
        char = pattern[pos]
        if char == "\\":
            if pattern.startswith("Q", pos + 1):
                end = pattern.find("\\E", pos + 2)
                if end < 0:
                    return False
                pos = end + 2
                continue
            if pattern[pos + 1 : pos + 2] in ("x", "p", "P") and pattern.startswith("{", pos + 2):
                # \x{41} and \p{Greek} hold a code point or a class name, not a count.
                end = pattern.find("}", pos + 3)
                pos = len(pattern) if end < 0 else end + 1
                continue
            pos += 2
        elif in_class:
            if pattern.startswith("[:", pos):
                end = pattern.find(":]", pos + 2)
                pos = len(pattern) if end < 0 else end + 2
                continue
            in_class = char != "]"
            pos += 1
        elif char == "[":
            in_class = True
            pos += 1
            if pattern.startswith("^", pos):
                pos += 1
            if pattern.startswith("]", pos):
                pos += 1  # a "]" first in a class is a member, not its end
        elif char == "{":
            match = _REPEAT.match(pattern, pos)
            if match and any(
                n is not None and len(n) > _MAX_COUNT_DIGITS for n in match.groups()
            ):
                return True
            pos += 1
        else:
            pos += 1
    return False


@dataclass(frozen=True, slots=True)
class FilterRegexp:
    """A compiled ``~=`` value; equal to another with the same pattern text."""

    pattern: str
    _compiled: Any = field(compare=False, repr=False)

    def search(self, text: str) -> bool:
        # Strings from gRPC are valid UTF-8; surrogateescape keeps any other text matchable.
        return self._compiled.search(text.encode("utf-8", "surrogateescape")) is not None


def compile_filter_regexp(pattern: str) -> FilterRegexp:
    """Compile a ``~=`` value; InvalidArgumentError for what Go's regexp would refuse."""
    if _has_oversized_repeat(pattern):
        raise InvalidArgumentError("invalid repeat count")
    try:
        raw = pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError("the pattern is not valid UTF-8") from None
    try:
        compiled = re2.compile(raw, _OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise InvalidArgumentError(str(detail)) from None
    return FilterRegexp(pattern, compiled)
