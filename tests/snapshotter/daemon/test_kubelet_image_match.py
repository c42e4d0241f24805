"""kubelet's matchImages rules, case by case, including the ones that surprise."""

from __future__ import annotations

import pytest

from snapshotter.daemon.kubelet_image_match import (
    BadPattern,
    check_pattern,
    glob_matches,
    image_matches,
)


@pytest.mark.parametrize(
    ("pattern", "image"),
    [
        ("123456789.dkr.ecr.us-east-1.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/app"),
        ("*.azurecr.io", "team.azurecr.io/app"),
        ("gcr.io", "gcr.io/project/app"),
        ("*.*.registry.io", "a.b.registry.io/x"),
        ("registry.io:8080/path", "registry.io:8080/path/app"),
        ("k8s.*.io", "k8s.gcr.io/pause"),
        ("k8s.*", "k8s.io/pause"),
        ("app*.k8s.io", "app1.k8s.io/x"),
        ("registry.io/pa", "registry.io/path/app"),  # a string prefix, not a path segment one
        ("reg[0-9].io", "reg7.io/x"),
        ("reg[^0-9].io", "regx.io/x"),
        ("localhost:5000", "localhost:5000/private/busybox"),
        ("[::1]:5000", "[::1]:5000/app"),
    ],
)
def test_matches(pattern: str, image: str) -> None:
    assert image_matches(pattern, image)


@pytest.mark.parametrize(
    ("pattern", "image"),
    [
        ("*.io", "team.azurecr.io/app"),  # one glob, one label
        ("*.azurecr.io", "azurecr.io/app"),
        ("registry.io", "registry.io:8080/app"),  # ports must be equal, absent included
        ("registry.io:8080", "registry.io/app"),
        ("registry.io:8080", "registry.io:8081/app"),
        ("registry.io/path", "registry.io/other/app"),
        ("reg[0-9].io", "regx.io/x"),
        ("Registry.io", "registry.io/x"),  # kubelet compares as written
        ("reg[.io", "reg[.io/x"),  # a glob Go refuses matches nothing
        ("", "registry.io/x"),
        ("reg?.io", "reg1.io/x"),  # as a URL, '?' starts the query: the host is "reg"
    ],
)
def test_does_not_match(pattern: str, image: str) -> None:
    assert not image_matches(pattern, image)


def test_glob_escapes_and_star_runs() -> None:
    assert glob_matches("a\\*b", "a*b") and not glob_matches("a\\*b", "axb")
    assert glob_matches("**x", "abcx") and glob_matches("*", "")
    assert not glob_matches("?", "") and glob_matches("re?", "reg")


@pytest.mark.parametrize("pattern", ["", "reg[.io", "reg\\", "registry.io:abc", "a b.io",
                                     "reg[]io"])
def test_check_pattern_refuses_what_kubelet_cannot_use(pattern: str) -> None:
    with pytest.raises(BadPattern):
        check_pattern(pattern)


def test_check_pattern_accepts_the_documented_examples() -> None:
    for pattern in ("*.azurecr.io", "registry.io:8080/path", "*.*.registry.io", "gcr.io"):
        check_pattern(pattern)
