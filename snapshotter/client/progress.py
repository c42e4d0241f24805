"""Progress of an unpack: one line per finished layer, and a live line on a terminal."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol, TextIO

Outcome = Literal["remote", "applied", "exists"]

MB = 1_000_000
LIVE_INTERVAL = 0.1  # seconds between two redraws of the live line


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


class NoProgress:
    def layer_started(self, number: int, total: int, digest: str, size: int) -> None:
        pass

    def layer_bytes(self, count: int) -> None:
        pass

    def layer_finished(self, result: LayerResult) -> None:
        pass


class TextProgress:
    """Prints each finished layer's line; on a terminal also a live ``fetching`` line."""

    def __init__(self, out: TextIO, *, live: bool | None = None) -> None:
        self._out = out
        self._live = out.isatty() if live is None else live
        self._label = ""
        self._size = 0
        self._done = 0
        self._drawn = 0.0

    def layer_started(self, number: int, total: int, digest: str, size: int) -> None:
        self._label = f"layer {number}/{total} {digest}"
        self._size, self._done, self._drawn = size, 0, 0.0

    def layer_bytes(self, count: int) -> None:
        self._done += count
        now = time.monotonic()
        if self._live and (now - self._drawn >= LIVE_INTERVAL or self._done >= self._size):
            self._drawn = now
            self._out.write(
                f"\r\x1b[K{self._label} fetching {self._done / MB:.1f}/{self._size / MB:.1f} MB"
            )
            self._out.flush()

    def layer_finished(self, result: LayerResult) -> None:
        prefix = "\r\x1b[K" if self._live else ""
        self._out.write(prefix + result.line() + "\n")
        self._out.flush()
