"""How ``lazysnap convert`` and ``lazysnap index`` report what went wrong: one line on stderr
naming the command (and the image where the error is about it), and the exit code."""

from __future__ import annotations

import pytest

from registry import NotFoundError, ServerError
from snapshotter.commands._registry_command import RegistryCommand, run_registry_command
from snapshotter.convert.soci import IndexImageError

COMMAND = RegistryCommand("index", "reg.test/app:1", IndexImageError, unwritten="the tag")


def _run(failure: BaseException) -> int:
    async def work(options: str) -> str:
        raise failure

    return run_registry_command(COMMAND, lambda: "options", work, lambda _: 0)


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

    def prepare() -> str:
        raise failure

    async def work(options: str) -> str:
        worked.append(options)
        return options

    assert run_registry_command(COMMAND, prepare, work, lambda _: 0) == 1
    assert worked == []
    assert capsys.readouterr().err.splitlines() == [f"lazysnap index: {failure}"]


def test_done_prints_the_result_and_gives_the_exit_code() -> None:
    async def work(options: str) -> str:
        return options + " worked"

    printed: list[str] = []

    def done(result: str) -> int:
        printed.append(result)
        return 0

    assert run_registry_command(COMMAND, lambda: "options", work, done) == 0
    assert printed == ["options worked"]


def test_an_unexpected_error_is_not_swallowed() -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        _run(RuntimeError("a bug"))
