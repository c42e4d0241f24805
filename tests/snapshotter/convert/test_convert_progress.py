"""``lazysnap convert``'s output: its lines as before off a terminal, with a bar on one."""

from __future__ import annotations

import io

from rich.console import Console

from snapshotter.convert.progress import ConvertBars, ConvertLines, convert_progress

LINES = [
    "layer 1/2 sha256:aa 1.0 MB -> estargz sha256:bb 1.1 MB pushed 0.3 s",
    "layer 2/2 sha256:cc 2.0 MB kept (estargz already) sha256:cc 2.0 MB exists 0.1 s",
]


def drive(progress: ConvertLines | ConvertBars) -> None:
    progress.say("first pass: convert to run the command")
    for number, line in enumerate(LINES, 1):
        progress.layer_done(number, len(LINES), line)
    progress.close()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_are_unchanged() -> None:
    out = io.StringIO()
    progress = convert_progress(out)
    assert isinstance(progress, ConvertLines)
    drive(progress)
    assert out.getvalue() == "first pass: convert to run the command\n" + "".join(
        line + "\n" for line in LINES
    )


def test_a_terminal_gets_the_lines_above_a_bar_of_layers() -> None:
    assert isinstance(convert_progress(FakeTerminal()), ConvertBars)
    out = io.StringIO()
    progress = convert_progress(
        out, Console(file=out, force_terminal=True, width=160, color_system=None)
    )
    assert isinstance(progress, ConvertBars)
    drive(progress)
    text = out.getvalue()
    assert "first pass: convert to run the command" in text
    assert all(line in text for line in LINES)
    final = text.rsplit("\x1b[2K", 1)[-1]
    assert "layers converted" in final and "2/2" in final
