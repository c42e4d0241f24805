"""``snapshotter.cli.entry``: a command that sets ``EXIT_PROMPTLY`` ends with ``os._exit`` once
its work is done and its output flushed, instead of the interpreter's slow teardown."""

from __future__ import annotations

import argparse
import atexit
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from snapshotter import cli
from snapshotter.commands import pull

REPO = Path(__file__).resolve().parents[2]


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _command(code: int, prompt: bool) -> types.ModuleType:
    module = types.ModuleType("fake_command")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass

    def run(args: argparse.Namespace) -> int:
        print("done", end="")  # left in stdout's buffer: exit_promptly must flush it
        return code

    module.add_arguments = add_arguments  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    if prompt:
        module.EXIT_PROMPTLY = True  # type: ignore[attr-defined]
    return module


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os._exit's codes; the call raises _Exited instead of ending pytest."""
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["lazysnap", "pull"])
    return codes


def test_the_pull_command_asks_for_a_prompt_exit() -> None:
    assert pull.EXIT_PROMPTLY is True


def test_a_prompt_command_ends_with_os_exit_after_atexit_handlers_and_flushing(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], exits: list[int]
) -> None:
    monkeypatch.setattr(cli, "_load", lambda name: _command(3, prompt=True))
    ran: list[str] = []
    atexit.register(ran.append, "handler")
    try:
        with pytest.raises(_Exited):
            cli.entry()
    finally:
        atexit.unregister(ran.append)
    assert exits == [3]
    assert ran == ["handler"]
    assert capfd.readouterr().out == "done"


def test_other_commands_exit_as_before(
    monkeypatch: pytest.MonkeyPatch, exits: list[int]
) -> None:
    monkeypatch.setattr(cli, "_load", lambda name: _command(4, prompt=False))
    with pytest.raises(SystemExit) as caught:
        cli.entry()
    assert caught.value.code == 4
    assert exits == []


def test_a_thread_still_working_gets_the_ordinary_exit(
    monkeypatch: pytest.MonkeyPatch, exits: list[int]
) -> None:
    monkeypatch.setattr(cli, "_load", lambda name: _command(0, prompt=True))
    release = threading.Event()
    worker = threading.Thread(target=release.wait)  # not a daemon: the interpreter waits for it
    worker.start()
    try:
        with pytest.raises(SystemExit) as caught:
            cli.entry()
    finally:
        release.set()
        worker.join()
    assert caught.value.code == 0
    assert exits == []


# A module-level object's finaliser runs in the interpreter's teardown only: it shows whether
# the process skipped it. The pull fails before any RPC (--password-stdin without --user).
PULL_PROGRAM = """
import sys

class Teardown:
    def __del__(self):
        sys.stderr.write("teardown ran\\n")

marker = Teardown()
sys.argv = ["lazysnap", "pull", "reg.example/app:1", "--password-stdin"]
from snapshotter.cli import entry
entry()
"""


def test_a_failing_pull_keeps_its_message_and_exit_code_and_skips_the_teardown() -> None:
    done = subprocess.run([sys.executable, "-c", PULL_PROGRAM], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1
    assert "--password-stdin needs --user USER" in done.stderr
    assert "teardown ran" not in done.stderr
