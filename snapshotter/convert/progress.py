"""What ``lazysnap convert`` shows while it works: its lines, and a bar on a terminal.

Not on a terminal, the lines are printed as they come, as before there were bars. On a
terminal the same lines scroll above a rich bar of the layers converted so far; the converter
reports layers when they are done, so the bar counts layers, not bytes.
"""

from __future__ import annotations

from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBars


class ConvertProgress(Protocol):
    def say(self, text: str) -> None: ...

    def layer_done(self, number: int, total: int, line: str) -> None: ...

    def close(self) -> None: ...


class ConvertLines:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def layer_done(self, number: int, total: int, line: str) -> None:
        self.say(line)

    def close(self) -> None:
        pass


class ConvertBars:
    def __init__(self, console: Console) -> None:
        self._bars = RichBars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._bars.start()
        # The number of layers is known with the first one done; until then the bar pulses.
        self._task: TaskID = self._bars.add_task("layers converted", total=None)

    def say(self, text: str) -> None:
        self._bars.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def layer_done(self, number: int, total: int, line: str) -> None:
        self.say(line)
        self._bars.update(self._task, total=total, completed=number)

    def close(self) -> None:
        self._bars.stop()


def convert_progress(out: TextIO, console: Console | None = None) -> ConvertProgress:
    if console is None and not out.isatty():
        return ConvertLines(out)
    return ConvertBars(console or Console(file=out))
