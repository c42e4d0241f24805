"""How ``lazysnap convert`` and ``lazysnap index`` report what went wrong: one line on stderr
naming the command (and the image where the error is about it), and the exit code."""

from __future__ import annotations

import argparse

import pytest

from registry import NotFoundError, ServerError
from snapshotter.commands._registry_command import RegistryCommand, run_registry_command
from snapshotter.convert.soci import IndexImageError

COMMAND = RegistryCommand("index", "reg.test/app:1", IndexImageError, unwritten="the tag")
ARGS = argparse.Namespace(image="reg.test/app:1")


def _options(args: argparse.Namespace) -> str:
    return f"options of {args.image}"


def _exit_zero(args: argparse.Namespace, result: str) -> int:
    return 0


def _run(failure: BaseException) -> int:
    async def work(args: argparse.Namespace, options: str) -> str:
        raise failure

    return run_registry_command(ARGS, COMMAND, _options, work, _exit_zero)


@pytest.mark.parametrize(
    ("failure", "code", "line"),
    [
        (NotFoundError("manifest unknown", status=404), 1,
         "lazysnap index: reg.test/app:1: not found in the registry: manifest unknown (HTTP 404)"),
        (ServerError("bad gateway", status=502), 1,
         "lazysnap index: ServerError: bad gateway (HTTP 502)"),
        (IndexImageError("no layer to index"), 1,
         "lazysnap index: reg.test/app:1: no layer to index"),
        (KeyboardInterrupt(), 130, "lazysnap index: interrupted (the tag was not written)"),
    ],
)  # fmt: skip
def test_each_failure_is_one_line_and_an_exit_code(
    failure: BaseException, code: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(failure) == code
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line]
    assert captured.out == ""


@pytest.mark.parametrize("failure", [IndexImageError("--tag is for v2"), ValueError("bad ref")])
def test_bad_input_stops_before_any_registry_work(
    failure: Exception, capsys: pytest.CaptureFixture[str]
) -> None:
    worked: list[str] = []

    def prepare(args: argparse.Namespace) -> str:
        raise failure

    async def work(args: argparse.Namespace, options: str) -> str:
        worked.append(options)
        return options

    assert run_registry_command(ARGS, COMMAND, prepare, work, _exit_zero) == 1
    assert worked == []
    assert capsys.readouterr().err.splitlines() == [f"lazysnap index: {failure}"]


def test_done_gets_what_the_work_gave_and_its_exit_code_is_the_commands() -> None:
    async def work(args: argparse.Namespace, options: str) -> str:
        return f"{options} worked"

    printed: list[str] = []

    def done(args: argparse.Namespace, result: str) -> int:
        printed.append(result)
        return 3

    assert run_registry_command(ARGS, COMMAND, _options, work, done) == 3
    assert printed == ["options of reg.test/app:1 worked"]


def test_an_unexpected_error_is_not_swallowed() -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        _run(RuntimeError("a bug"))
