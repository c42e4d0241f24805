"""``lazysnap trace report``: read a trace file and sum it up as text.

A trace is JSON lines (docs/trace.md): a ``start`` line, ``read`` and ``range`` lines, and an
``end`` line. A recording that was interrupted leaves a cut last line and no ``end``: both are
reported as warnings, and what the file holds is still summed up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("on-demand", "prefetch", "background", "index")
TOP_FILES = 10
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Read:
    """The first read of a file: asked at ``time``, answered ``wait`` seconds later."""

    time: float
    layer: str
    path: str
    size: int
    file_size: int
    wait: float
    error: str = ""

    @property
    def answered(self) -> float:
        return self.time + self.wait


@dataclass(frozen=True, slots=True)
class Fetch:
    """One range read from a blob, from ``time`` for ``duration`` seconds."""

    time: float
    digest: str
    start: int
    end: int
    kind: str
    duration: float
    error: str = ""

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def done(self) -> float:
        return self.time + self.duration


@dataclass(slots=True)
class Trace:
    start: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    reads: list[Read] = field(default_factory=list)
    fetches: list[Fetch] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def window(self) -> float:
        """Seconds from the start to the last thing recorded."""
        last = [r.answered for r in self.reads] + [f.done for f in self.fetches]
        if self.end is not None:
            last.append(float(self.end.get("time", 0.0)))
        return max(last, default=0.0)


def load_trace(lines: Iterable[str]) -> Trace:
    trace = Trace()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            _add(trace, record)
        except (ValueError, KeyError, TypeError) as exc:
            cut = not line.endswith("\n")
            why = "is cut short" if cut else f"cannot be read ({type(exc).__name__}: {exc})"
            trace.warnings.append(f"line {number} {why}: skipped")
    if not trace.start:
        trace.warnings.append("no start line: is this a lazysnap trace?")
    if trace.end is None:
        trace.warnings.append("no end line: the recording did not finish; showing what it has")
    elif trace.end.get("dropped"):
        trace.warnings.append(
            f"the daemon dropped {trace.end['dropped']} events: the recorder read too slowly"
        )
    return trace


def _add(trace: Trace, record: dict[str, Any]) -> None:
    kind = record["type"]
    if kind == "read":
        trace.reads.append(Read(
            time=float(record["time"]), layer=str(record["layer"]), path=str(record["path"]),
            size=int(record["size"]), file_size=int(record.get("file_size", 0)),
            wait=float(record["wait"]), error=str(record.get("error", "")),
        ))
    elif kind == "range":
        trace.fetches.append(Fetch(
            time=float(record["time"]), digest=str(record["digest"]), start=int(record["start"]),
            end=int(record["end"]), kind=str(record["kind"]), duration=float(record["duration"]),
            error=str(record.get("error", "")),
        ))
    elif kind == "start":
        trace.start = record
    elif kind == "end":
        trace.end = record


def covered(intervals: Iterable[tuple[float, float]]) -> float:
    """Seconds during which at least one of ``intervals`` was open."""
    total = 0.0
    reach = -float("inf")
    for begin, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(begin, reach)
        reach = end
    return total


@dataclass(frozen=True, slots=True)
class Summary:
    window: float
    files: int
    bytes_needed: int  # sizes of the files read
    fetched: dict[str, int]  # bytes by kind
    ranges: int
    waiting: float  # seconds with at least one first read waiting
    wait_sum: float  # the first reads' waits added up
    network: float  # seconds with at least one range in flight
    failed_reads: int
    failed_ranges: int
    top: Sequence[Read]

    @property
    def fetched_total(self) -> int:
        return sum(self.fetched.values())


def summarize(trace: Trace, top: int = TOP_FILES) -> Summary:
    fetched = dict.fromkeys(KINDS, 0)
    for fetch in trace.fetches:
        if not fetch.error:
            fetched[fetch.kind] = fetched.get(fetch.kind, 0) + fetch.length
    return Summary(
        window=trace.window,
        files=len(trace.reads),
        bytes_needed=sum(r.file_size for r in trace.reads),
        fetched=fetched,
        ranges=len(trace.fetches),
        waiting=covered((r.time, r.answered) for r in trace.reads),
        wait_sum=sum(r.wait for r in trace.reads),
        network=covered((f.time, f.done) for f in trace.fetches),
        failed_reads=sum(1 for r in trace.reads if r.error),
        failed_ranges=sum(1 for f in trace.fetches if f.error),
        top=sorted(trace.reads, key=lambda r: r.wait, reverse=True)[:top],
    )


def summary_text(summary: Summary) -> str:
    fetched = ", ".join(
        f"{kind} {count / MB:.2f} MB" for kind, count in summary.fetched.items() if count
    )
    lines = [
        f"window            {summary.window:.3f} s",
        f"files read        {summary.files} ({summary.bytes_needed / MB:.2f} MB of file data)",
        f"fetched           {summary.fetched_total / MB:.2f} MB compressed in {summary.ranges} "
        f"ranges ({fetched or 'none'})",
        f"network busy      {summary.network:.3f} s (at least one range in flight)",
        f"readers waiting   {summary.waiting:.3f} s (at least one first read waiting; "
        f"{summary.wait_sum:.3f} s added up)",
    ]
    if summary.failed_reads or summary.failed_ranges:
        lines.append(
            f"failures          {summary.failed_reads} reads, {summary.failed_ranges} ranges"
        )
    if summary.top:
        lines.append("top files by wait:")
        lines.extend(
            f"  {read.wait * 1000:9.1f} ms  {read.path}  ({read.layer})" for read in summary.top
        )
    return "\n".join(lines)
