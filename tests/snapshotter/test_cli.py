"""``snapshotter.cli``: the dispatcher builds what the command line needs, and no more."""

from __future__ import annotations

import argparse

import pytest

from snapshotter import cli


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_a_command_named_first_gets_only_its_own_parser() -> None:
    parser, module = cli.build_parser(["pull", "reg.example/app:1"])
    assert _commands(parser) == ["pull"]
    assert module is not None and module.__name__ == "snapshotter.commands.pull"
    assert parser.parse_args(["pull", "reg.example/app:1"]).image == "reg.example/app:1"


@pytest.mark.parametrize("argv", [[], ["--help"], ["--help", "pull"], ["pul"]])
def test_without_a_command_first_every_command_is_listed(argv: list[str]) -> None:
    parser, module = cli.build_parser(argv)
    assert _commands(parser) == list(cli.COMMAND_MODULES)
    assert module is None


def test_a_mistyped_command_is_refused_with_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["pul", "x"])
    assert caught.value.code == 2
    assert "invalid choice: 'pul' (choose from 'serve', 'status'" in capsys.readouterr().err
