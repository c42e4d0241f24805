"""``lazysnap convert``'s command line: arguments, and input errors as one line with exit 1."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from snapshotter import cli


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``run`` installs a stderr handler on the root logger; capsys closes that stream."""
    handlers, level = list(logging.root.handlers), logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_convert_is_a_registered_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--format", "--prioritize", "--platform", "--all-platforms", "--chunk-size",
                   "--optimize", "--hosts-dir", "--plain-http"):
        assert option in usage


@pytest.mark.parametrize(
    "extra",
    [
        ["--format", "gzip"],
        ["--chunk-size", "100"],
        ["--chunk-size", "big"],
        ["--chunk-size", str(64 * 1024 * 1024 + 1)],  # lazysnap would refuse to serve it
    ],
)
def test_bad_options_are_usage_errors(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["convert", "reg.test/a:1", "reg.test/a:2", *extra])
    assert exited.value.code == 2
    assert "lazysnap convert: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad Reference", "reg.test/a:2"], "lazysnap convert: "),
        (["reg.test/a:1", "reg.test/a:2", "--platform", "linux"], "invalid platform"),
        (["reg.test/a:1", "reg.test/a:2", "--prioritize", "/"], "not a file path"),
        (["reg.test/a:1", "reg.test/a:2", "--optimize", " "], "--optimize needs a command"),
        (["reg.test/a:1", "reg.test/a:2", "--optimize", "sh -c 'x"], "--optimize: No closing"),
        (["reg.test/a:1", "reg.test/a:2", "--optimize", "true", "--optimize-timeout", "0"],
         "must be positive"),
    ],
)
def test_bad_input_fails_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["convert", *args]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazysnap convert: ") and message in lines[0]
    assert captured.out == ""
