"""``lazysnap trace report``: reading traces (cut ones too), the summary, and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from snapshotter.cli import main
from snapshotter.client.trace_plot import KIND_COLOURS, PlotUnavailable, build_figure, render
from snapshotter.client.trace_report import covered, load_trace, summarize, summary_text


def trace_lines() -> list[dict[str, Any]]:
    return [
        {"type": "start", "unix_time": 1.0, "daemon_pid": 1, "daemon_version": "t",
         "duration": 2.0},
        {"type": "range", "time": 0.0, "digest": "sha256:a", "start": 0, "end": 4096,
         "bytes": 4096, "kind": "index", "duration": 0.05},
        {"type": "read", "time": 0.1, "layer": "1", "digest": "sha256:a", "path": "bin/sh",
         "offset": 0, "size": 4096, "file_size": 2_000_000, "wait": 0.4},
        {"type": "range", "time": 0.12, "digest": "sha256:a", "start": 4096, "end": 1_004_096,
         "bytes": 1_000_000, "kind": "on-demand", "duration": 0.3},
        {"type": "read", "time": 0.3, "layer": "1", "digest": "sha256:a", "path": "lib/libc.so",
         "offset": 0, "size": 4096, "file_size": 1_000_000, "wait": 0.4},
        {"type": "read", "time": 1.0, "layer": "1", "digest": "sha256:a", "path": "etc/passwd",
         "offset": 0, "size": 4096, "file_size": 500, "wait": 0.001},
        {"type": "range", "time": 0.5, "digest": "sha256:a", "start": 1_004_096,
         "end": 3_004_096, "bytes": 2_000_000, "kind": "background", "duration": 1.0},
        {"type": "range", "time": 1.6, "digest": "sha256:a", "start": 0, "end": 10,
         "bytes": 10, "kind": "prefetch", "duration": 0.1, "error": "OSError"},
        {"type": "end", "time": 2.0, "events": 7, "dropped": 0},
    ]


def write_trace(path: Path, records: list[dict[str, Any]], *, cut: int = 0) -> Path:
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text[: len(text) - cut] if cut else text)
    return path


def test_summary_numbers() -> None:
    trace = load_trace(json.dumps(r) + "\n" for r in trace_lines())
    assert trace.warnings == []
    summary = summarize(trace)
    assert summary.files == 3 and summary.bytes_needed == 3_000_500
    assert summary.fetched == {
        "on-demand": 1_000_000, "prefetch": 0, "background": 2_000_000, "index": 4096
    }  # the failed range fetched nothing
    assert summary.ranges == 4 and summary.failed_ranges == 1
    assert summary.waiting == pytest.approx(0.6 + 0.001)  # [0.1, 0.7] and [1.0, 1.001]
    assert summary.wait_sum == pytest.approx(0.801)
    assert summary.network == pytest.approx(1.45)  # [0, .05] [.12, .42] [.5, 1.5] [1.6, 1.7]
    assert [read.path for read in summary.top] == ["bin/sh", "lib/libc.so", "etc/passwd"]
    assert summary.window == pytest.approx(2.0)
    text = summary_text(summary)
    assert "files read        3 (3.00 MB of file data)" in text
    assert "on-demand 1.00 MB" in text and "background 2.00 MB" in text
    assert "failures          0 reads, 1 ranges" in text
    assert text.splitlines()[-3].split() == ["400.0", "ms", "bin/sh", "(1)"]


def test_covered_merges_overlaps() -> None:
    assert covered([(0, 1), (0.5, 2), (3, 4), (3.5, 3.6)]) == pytest.approx(3.0)
    assert covered([]) == 0


def test_a_cut_trace_is_read_up_to_its_last_whole_line(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", trace_lines()[:-1], cut=20)
    with path.open() as lines:
        trace = load_trace(lines)
    assert len(trace.reads) == 3 and len(trace.fetches) == 3  # the last range was cut
    assert trace.warnings == [
        "line 8 is cut short: skipped",
        "no end line: the recording did not finish; showing what it has",
    ]


def test_dropped_events_are_a_warning() -> None:
    records = trace_lines()
    records[-1]["dropped"] = 5
    trace = load_trace(json.dumps(r) + "\n" for r in records)
    assert trace.warnings == ["the daemon dropped 5 events: the recorder read too slowly"]


def png_pixels(path: Path) -> Any:
    from matplotlib import image  # noqa: PLC0415

    return image.imread(path)


def has_colour(pixels: Any, colour: str) -> bool:
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    import numpy  # noqa: PLC0415

    close = numpy.abs(pixels[:, :, :3] - numpy.array(rgb)).max(axis=2) < 0.02
    return int(close.sum()) > 50


def test_report_of_a_cut_trace_writes_a_png_and_an_svg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_trace(tmp_path / "t.jsonl", trace_lines()[:-1], cut=20)
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    assert main(["trace", "report", str(path), "--png", str(png), "--svg", str(svg)]) == 0
    captured = capsys.readouterr()
    assert "warning: line 8 is cut short: skipped" in captured.err
    assert "files read        3" in captured.out
    pixels = png_pixels(png)
    assert pixels.shape[:2] == (1500, 1500)  # 10 x 10 inches at 150 dpi
    assert pixels[:, :, :3].std() > 0.05  # not blank
    assert has_colour(pixels, KIND_COLOURS["on-demand"])
    assert has_colour(pixels, KIND_COLOURS["background"])
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


def test_an_empty_trace_still_plots(tmp_path: Path) -> None:
    trace = load_trace([json.dumps(trace_lines()[0]) + "\n"])
    render(trace, [tmp_path / "e.png"])
    assert png_pixels(tmp_path / "e.png").shape[:2] == (1500, 1500)


def test_without_matplotlib_the_summary_and_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    trace = load_trace(json.dumps(r) + "\n" for r in trace_lines())
    with pytest.raises(PlotUnavailable, match=r"lazysnap\[plot\]"):
        build_figure(trace)
    path = write_trace(tmp_path / "t.jsonl", trace_lines())
    assert main(["trace", "report", str(path), "--png", str(tmp_path / "t.png")]) == 1
    captured = capsys.readouterr()
    assert "files read        3" in captured.out
    assert "pip install 'lazysnap[plot]'" in captured.err
    assert not (tmp_path / "t.png").exists()


def test_until_cuts_the_time_axis_and_what_is_drawn() -> None:
    trace = load_trace(json.dumps(r) + "\n" for r in trace_lines())
    figure = build_figure(trace, until=0.6)
    waits = figure.axes[2]
    assert waits.get_xlim() == (0, 0.6)
    labels = [tick.get_text() for tick in waits.get_yticklabels()]
    assert labels == ["bin/sh", "lib/libc.so"]  # etc/passwd is read at 1.0 s
    whole = build_figure(trace)
    assert [t.get_text() for t in whole.axes[2].get_yticklabels()] == [
        "bin/sh", "lib/libc.so", "etc/passwd"
    ]
