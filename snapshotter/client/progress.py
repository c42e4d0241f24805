"""Progress of an unpack: one line per finished layer, or live bars on a terminal.

Not on a terminal (a pipe, a log file, CI), each finished layer is one plain line, the same
lines as before there were bars, so scripts that read them keep working. On a terminal, rich
draws one bar per layer with its bytes, rate and time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

Outcome = Literal["remote", "applied", "exists"]

MB = 1_000_000
DIGEST_CHARS = 19  # "sha256:" and 12 hex digits: enough to tell layers apart on a bar


@dataclass(frozen=True, slots=True)
class LayerResult:
    number: int  # 1-based
    total: int
    digest: str
    chain_id: str
    outcome: Outcome  # remote: served lazily; applied: fetched and unpacked; exists: already there
    size: int  # bytes written into containerd's content store, or 0
    seconds: float

    def line(self) -> str:
        return (
            f"layer {self.number}/{self.total} {self.digest} {self.outcome:<7} "
            f"{self.size / MB:6.1f} MB {self.seconds:6.1f} s"
        )


class Progress(Protocol):
    def layer_started(self, number: int, total: int, digest: str, size: int) -> None: ...

    def layer_bytes(self, count: int) -> None: ...

    def layer_finished(self, result: LayerResult) -> None: ...

    def close(self) -> None:
        """The last layer is done or the work failed: leave the terminal tidy."""
        ...


class NoProgress:
    def layer_started(self, number: int, total: int, digest: str, size: int) -> None:
        pass

    def layer_bytes(self, count: int) -> None:
        pass

    def layer_finished(self, result: LayerResult) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress(NoProgress):
    """One line per finished layer, nothing else: for pipes and logs."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def layer_finished(self, result: LayerResult) -> None:
        self._out.write(result.line() + "\n")
        self._out.flush()


class BarsProgress:
    """A rich bar per layer: bytes fetched of its size, rate, time; its outcome when done."""

    def __init__(self, console: Console) -> None:
        # rich is imported only for a terminal: `lazysnap pull` into a pipe starts faster.
        from rich.progress import (  # noqa: PLC0415
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichBars  # noqa: PLC0415

        self._bars = RichBars(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[int, TaskID] = {}
        self._current: TaskID | None = None
        self._live = False

    def layer_started(self, number: int, total: int, digest: str, size: int) -> None:
        if not self._live:
            self._bars.start()
            self._live = True
        label = f"layer {number}/{total} {digest[:DIGEST_CHARS]}"
        self._current = self._tasks[number] = self._bars.add_task(label, total=size or None)

    def layer_bytes(self, count: int) -> None:
        # Bytes belong to the layer started last: layers are fetched one after the other.
        if self._current is not None:
            self._bars.advance(self._current, count)

    def layer_finished(self, result: LayerResult) -> None:
        task = self._tasks.get(result.number)
        if task is None:
            return
        # The bytes stay what was fetched: a layer served lazily (remote) or already there
        # (exists) shows how little of it came down.
        self._bars.update(
            task,
            description=f"layer {result.number}/{result.total} "
            f"{result.digest[:DIGEST_CHARS]} {result.outcome:<7}",
        )
        self._bars.stop_task(task)

    def close(self) -> None:
        if self._live:
            self._bars.stop()
            self._live = False


def layer_progress(out: TextIO, *, quiet: bool = False, console: Console | None = None) -> Progress:
    """What ``lazysnap pull`` and ``unpack`` show: bars on a terminal, else plain lines."""
    if quiet:
        return NoProgress()
    if console is None and not out.isatty():
        return PlainProgress(out)
    if console is None:
        from rich.console import Console  # noqa: PLC0415

        console = Console(file=out)
    return BarsProgress(console)
