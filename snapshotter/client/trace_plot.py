"""The timeline plot of a trace (``lazysnap trace report --png/--svg``), with matplotlib.

matplotlib is the optional extra ``lazysnap[plot]``; ``PlotUnavailable`` says so when it is
missing. Three panels share the time axis, so a reader's wait lines up with the ranges behind
it: bytes needed against bytes fetched, bytes in flight, and the files that waited longest.
Colours are the Okabe-Ito set, which stays apart for colour-blind readers and in grey print.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.client.trace_report import KINDS, MB, Fetch, Trace, summarize

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

KIND_COLOURS = {
    "on-demand": "#0072B2",  # blue
    "prefetch": "#E69F00",  # orange
    "background": "#009E73",  # green
    "index": "#CC79A7",  # purple
}
NEEDED_COLOUR = "#000000"
WAIT_COLOUR = "#D55E00"  # vermillion
FAILED_COLOUR = "#999999"
WAIT_ROWS = 20  # files in the waits panel
PATH_CHARS = 48


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def render(
    trace: Trace, outputs: list[Path], title: str = "", until: float | None = None
) -> None:
    """Write the plot to each of ``outputs``; the format follows the suffix (.png, .svg).
    ``until``: the time axis ends there, to look at a start without the background fetch."""
    figure = build_figure(trace, title, until)
    for path in outputs:
        figure.savefig(path, dpi=150)


def build_figure(trace: Trace, title: str = "", until: float | None = None) -> Figure:
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 (the optional extra)
    except ImportError:
        raise PlotUnavailable(
            "plots need matplotlib: pip install 'lazysnap[plot]'"
        ) from None
    figure = Figure(figsize=(10, 10), layout="constrained")
    needed, flight, waits = figure.subplots(
        3, 1, sharex=True, height_ratios=[3, 2, 4]
    )
    window = max(trace.window, 1e-3)
    shown = trace if until is None else _until(trace, until)
    _bytes_over_time(needed, shown)
    _bytes_in_flight(flight, shown)
    _waits(waits, shown)
    waits.set_xlabel("time since recording began (s)")
    waits.set_xlim(0, until if until else window * 1.02)
    summary = summarize(trace)
    figure.suptitle(
        (title + "\n" if title else "")
        + f"{summary.files} files read, {summary.bytes_needed / MB:.1f} MB of file data; "
        f"{summary.fetched_total / MB:.1f} MB fetched in {summary.ranges} ranges; "
        f"readers waited {summary.waiting:.2f} s"
        + ("" if until is None else f"\n(the whole trace; plotted: its first {until:g} s)"),
        fontsize=11,
    )
    return figure


def _until(trace: Trace, until: float) -> Trace:
    """What started before ``until``, so the axes scale to what is shown."""
    return Trace(
        start=trace.start,
        end=trace.end,
        reads=[r for r in trace.reads if r.time <= until],
        fetches=[f for f in trace.fetches if f.time <= until],
    )


def _cumulative(points: list[tuple[float, int]]) -> tuple[list[float], list[float]]:
    """Step coordinates of a running total in MB, starting at zero."""
    times, totals, total = [0.0], [0.0], 0
    for time, count in sorted(points):
        total += count
        times.append(time)
        totals.append(total / MB)
    return times, totals


def _bytes_over_time(axes: Axes, trace: Trace) -> None:
    """Cumulative MB of the files first read against cumulative MB fetched, by kind."""
    times, totals = _cumulative([(r.time, r.file_size) for r in trace.reads])
    axes.step(times, totals, where="post", color=NEEDED_COLOUR, linewidth=2,
              label="file data first read")
    for kind in KINDS:
        done = [(f.done, f.length) for f in trace.fetches if f.kind == kind and not f.error]
        if done:
            times, totals = _cumulative(done)
            axes.step(times, totals, where="post", color=KIND_COLOURS[kind], linewidth=1.6,
                      label=f"fetched: {kind}")
    axes.set_ylabel("cumulative MB")
    axes.set_title("Reads against fetches", loc="left", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=8, frameon=False)
    axes.set_ylim(bottom=0)


def _bytes_in_flight(axes: Axes, trace: Trace) -> None:
    """MB requested and not yet arrived, stacked by kind."""
    edges = sorted({0.0, *(f.time for f in trace.fetches), *(f.done for f in trace.fetches)})
    stacks: list[list[float]] = []
    labels: list[str] = []
    colours: list[str] = []
    for kind in KINDS:
        ranges = [f for f in trace.fetches if f.kind == kind]
        if not ranges:
            continue
        stacks.append(_in_flight(ranges, edges))
        labels.append(kind)
        colours.append(KIND_COLOURS[kind])
    if stacks:
        axes.stackplot(edges, *stacks, labels=labels, colors=colours, step="post", alpha=0.85)
        axes.legend(loc="best", fontsize=8, framealpha=0.9)
    else:
        axes.text(0.5, 0.5, "no ranges fetched", transform=axes.transAxes, ha="center")
    axes.set_ylabel("MB in flight")
    axes.set_title("Bytes in flight", loc="left", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.set_ylim(bottom=0)


def _in_flight(ranges: list[Fetch], edges: list[float]) -> list[float]:
    """MB in flight from each edge on, by a sweep: a range counts from its start to its end."""
    changes: dict[float, int] = {}
    for fetch in ranges:
        changes[fetch.time] = changes.get(fetch.time, 0) + fetch.length
        changes[fetch.done] = changes.get(fetch.done, 0) - fetch.length
    level, levels = 0, []
    for edge in edges:
        level += changes.get(edge, 0)
        levels.append(level / MB)
    return levels


def _waits(axes: Axes, trace: Trace) -> None:
    """Each of the longest first-read waits as a bar from asked to answered."""
    slowest = sorted(trace.reads, key=lambda r: r.wait, reverse=True)[:WAIT_ROWS]
    rows = sorted(slowest, key=lambda r: r.time)
    if not rows:
        axes.text(0.5, 0.5, "no first reads", transform=axes.transAxes, ha="center")
    for row, read in enumerate(rows):
        colour = FAILED_COLOUR if read.error else WAIT_COLOUR
        # A bar too short to see still gets a marker at its start.
        axes.barh(row, max(read.wait, 0.0), left=read.time, height=0.6, color=colour)
        axes.plot(read.time, row, marker="|", color=colour, markersize=8)
    axes.set_yticks(range(len(rows)), [_short(read.path) for read in rows], fontsize=7)
    axes.invert_yaxis()
    shown = len(rows)
    axes.set_title(
        f"Waits per file: the {shown} longest first reads of {len(trace.reads)}, "
        "from request to answer (ticks on top: every first read)", loc="left", fontsize=10,
    )
    axes.grid(True, axis="x", alpha=0.3)
    # One marker per first read along the top shows when files were opened.
    for read in trace.reads:
        axes.axvline(read.time, ymin=0.985, ymax=1.0, color=NEEDED_COLOUR, linewidth=0.5)


def _short(path: str) -> str:
    return path if len(path) <= PATH_CHARS else "…" + path[-(PATH_CHARS - 1):]
