"""``lazysnap trace``: record what the lazy filesystem does, and report on a recording.

    lazysnap trace record --output start.jsonl -- ctr run --rm IMAGE id true
    lazysnap trace record --output idle.jsonl --duration 30
    lazysnap trace report start.jsonl --png start.png --svg start.svg
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from snapshotter.client.trace_plot import PlotUnavailable, render
from snapshotter.client.trace_recorder import TraceUnavailable, record
from snapshotter.client.trace_report import load_trace, summarize, summary_text
from snapshotter.daemon.config import DEFAULT_ADDRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    record = actions.add_parser(
        "record", help="record first reads and registry ranges into a JSON lines file",
        description="Record until --duration passed, or while COMMAND runs (after --).",
    )
    record.add_argument("--address", default=str(DEFAULT_ADDRESS), help="the daemon's socket")
    record.add_argument("--output", "-o", type=Path, required=True, help="the trace file")
    record.add_argument("--duration", type=float, default=0.0,
                        help="seconds to record (without a command; 0: until Ctrl-C or SIGTERM)")
    record.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- COMMAND...: record while it runs; its exit status is ours")
    report = actions.add_parser(
        "report", help="sum up a trace as text, and plot it with --png/--svg",
    )
    report.add_argument("trace", type=Path, help="a file written by `lazysnap trace record`")
    report.add_argument("--png", type=Path, help="write the timeline plot as PNG")
    report.add_argument("--svg", type=Path, help="write the timeline plot as SVG")
    report.add_argument("--title", default="", help="a title above the plot")
    report.add_argument("--until", type=float, metavar="SECONDS",
                        help="end the plot's time axis there (the summary covers everything)")


def run(args: argparse.Namespace) -> int:
    if args.action == "record":
        return _record(args)
    return _report(args)


def _record(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and args.duration:
        print("lazysnap: give --duration or a command, not both", file=sys.stderr)
        return 2
    if args.duration < 0:
        print("lazysnap: --duration must not be negative", file=sys.stderr)
        return 2
    # SIGTERM ends a recording as Ctrl-C does, with its end line: a recorder started in the
    # background (where SIGINT is ignored) can be stopped cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Line buffered: the file can be followed while it grows, and a killed recorder
        # loses at most the line it was writing.
        with args.output.open("w", encoding="utf-8", buffering=1) as out:
            status = record(args.address, out, duration=args.duration, command=command)
    except TraceUnavailable as exc:
        args.output.unlink(missing_ok=True)
        print(f"lazysnap: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lazysnap: cannot record: {exc}", file=sys.stderr)
        return 1
    print(f"trace written to {args.output}", file=sys.stderr)
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _report(args: argparse.Namespace) -> int:
    try:
        with args.trace.open(encoding="utf-8", errors="replace") as lines:
            trace = load_trace(lines)
    except OSError as exc:
        print(f"lazysnap: cannot read the trace: {exc}", file=sys.stderr)
        return 1
    for warning in trace.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary_text(summarize(trace)))
    outputs = [path for path in (args.png, args.svg) if path is not None]
    if not outputs:
        return 0
    try:
        render(trace, outputs, args.title, args.until)
    except PlotUnavailable as exc:
        print(f"lazysnap: no plot written: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lazysnap: cannot write the plot: {exc}", file=sys.stderr)
        return 1
    for path in outputs:
        print(f"plot written to {path}", file=sys.stderr)
    return 0
