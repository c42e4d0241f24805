"""kubelet's rules for matching an image against a credential provider's ``matchImages`` entry
or a key of its ``auth`` answer.

Both sides are read as URLs without a scheme: a host, an optional port, an optional path. They
match when the ports are equal (both absent counts as equal), the hosts have as many
dot-separated labels and each label matches its glob (``*`` never crosses a dot), and the
pattern's path is a prefix of the image's path, compared as plain strings. Only the host may
hold globs. A pattern that cannot be read, or a glob kubelet's Go ``filepath.Match`` refuses,
matches nothing, as in kubelet.
"""

from __future__ import annotations

from dataclasses import dataclass


class BadPattern(ValueError):
    """A pattern or glob that kubelet would refuse."""


@dataclass(frozen=True, slots=True)
class SchemelessUrl:
    labels: tuple[str, ...]
    port: str
    path: str


def _split_host_port(netloc: str) -> tuple[str, str]:
    # Go's net.SplitHostPort, and its fallback in kubelet: no port when it cannot split.
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            return netloc, ""
        rest = netloc[end + 1 :]
        return (netloc[1:end], rest[1:]) if rest.startswith(":") else (netloc, "")
    host, colon, port = netloc.rpartition(":")
    if not colon or ":" in host:
        return netloc, ""
    return host, port


def parse_schemeless(text: str) -> SchemelessUrl:
    """``host[:port][/path]`` as kubelet reads it (Go's url.Parse after an ``https://``)."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise BadPattern("control character or space")
    end = len(text)
    for stop in "/?#":
        found = text.find(stop)
        if 0 <= found < end:
            end = found
    netloc, rest = text[:end], text[end:]
    path = rest.split("?", 1)[0].split("#", 1)[0]
    netloc = netloc.rpartition("@")[2]  # user information is no part of the host
    host, port = _split_host_port(netloc)
    if port and not port.isdigit():
        raise BadPattern("the port is not a number")
    return SchemelessUrl(tuple(host.split(".")), port, path)


def _class_matches(pattern: str, i: int, char: str) -> tuple[bool, int]:
    """Whether ``char`` is in the class starting after ``[`` at ``i``; the index after ``]``."""
    negated = i < len(pattern) and pattern[i] == "^"
    if negated:
        i += 1
    found = False
    first = True
    while True:
        if i >= len(pattern):
            raise BadPattern("unterminated character class")
        if pattern[i] == "]" and not first:
            return found != negated, i + 1
        first = False
        low, i = _class_char(pattern, i)
        high = low
        if i < len(pattern) and pattern[i] == "-":
            high, i = _class_char(pattern, i + 1)
        if low <= char <= high:
            found = True


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern) or pattern[i] in "-]":
        raise BadPattern("bad character class")
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise BadPattern("trailing backslash")
    return pattern[i], i + 1


def _check_glob(pattern: str) -> None:
    # Go validates the whole pattern even when a match is decided early.
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern):
                raise BadPattern("trailing backslash")
            i += 2
        elif c == "[":
            _, i = _class_matches(pattern, i + 1, "")
        else:
            i += 1


def glob_matches(pattern: str, name: str) -> bool:
    """Go's ``filepath.Match`` on one label: ``*``, ``?``, ``[a-z]``, ``[^a]``, ``\\`` escapes."""
    _check_glob(pattern)
    return _match_from(pattern, 0, name, 0)


def _match_from(pattern: str, p: int, name: str, n: int) -> bool:
    while p < len(pattern):
        c = pattern[p]
        if c == "*":
            while p < len(pattern) and pattern[p] == "*":
                p += 1
            if p == len(pattern):
                return "/" not in name[n:]
            for start in range(n, len(name) + 1):
                if _match_from(pattern, p, name, start):
                    return True
                if start < len(name) and name[start] == "/":
                    return False
            return False
        if n >= len(name):
            return False
        if c == "?":
            if name[n] == "/":
                return False
            p, n = p + 1, n + 1
        elif c == "[":
            ok, p = _class_matches(pattern, p + 1, name[n])
            if not ok:
                return False
            n += 1
        else:
            if c == "\\":
                p += 1
                c = pattern[p]
            if c != name[n]:
                return False
            p, n = p + 1, n + 1
    return n == len(name)


def image_matches(pattern: str, image: str) -> bool:
    """Whether ``image`` (``host[:port]/path``) matches ``pattern`` by kubelet's rules."""
    try:
        glob, target = parse_schemeless(pattern), parse_schemeless(image)
        if glob.port != target.port or len(glob.labels) != len(target.labels):
            return False
        if not target.path.startswith(glob.path):
            return False
        return all(glob_matches(g, t) for g, t in zip(glob.labels, target.labels, strict=True))
    except BadPattern:
        return False


def check_pattern(pattern: str) -> None:
    """Raise BadPattern unless ``pattern`` is one kubelet accepts in ``matchImages``."""
    if not pattern:
        raise BadPattern("empty")
    for label in parse_schemeless(pattern).labels:
        _check_glob(label)
