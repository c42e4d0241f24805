"""Layer progress: plain lines off a terminal (unchanged), rich bars on one."""

from __future__ import annotations

import io

from rich.console import Console

from snapshotter.client.progress import (
    BarsProgress,
    LayerResult,
    NoProgress,
    PlainProgress,
    layer_progress,
)

LAYERS = [
    ("sha256:" + "a" * 64, 2_000_000, LayerResult(1, 3, "sha256:" + "a" * 64, "sha256:c1",
                                                  "applied", 2_000_000, 0.5)),
    ("sha256:" + "b" * 64, 9_000_000, LayerResult(2, 3, "sha256:" + "b" * 64, "sha256:c2",
                                                  "remote", 0, 0.25)),
    ("sha256:" + "c" * 64, 500, LayerResult(3, 3, "sha256:" + "c" * 64, "sha256:c3",
                                            "exists", 0, 0.0)),
]


def drive(progress: object) -> None:
    assert isinstance(progress, (PlainProgress, BarsProgress))
    for digest, size, result in LAYERS:
        progress.layer_started(result.number, result.total, digest, size)
        if result.outcome == "applied":
            for _ in range(4):
                progress.layer_bytes(size // 4)
        progress.layer_finished(result)
    progress.close()


def test_plain_lines_stay_exactly_as_they_were() -> None:
    out = io.StringIO()
    drive(PlainProgress(out))
    assert out.getvalue() == (
        f"layer 1/3 sha256:{'a' * 64} applied    2.0 MB    0.5 s\n"
        f"layer 2/3 sha256:{'b' * 64} remote     0.0 MB    0.2 s\n"
        f"layer 3/3 sha256:{'c' * 64} exists     0.0 MB    0.0 s\n"
    )


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_kind_of_output_picks_the_renderer() -> None:
    assert isinstance(layer_progress(io.StringIO()), PlainProgress)  # a pipe or a file
    assert isinstance(layer_progress(FakeTerminal()), BarsProgress)
    assert isinstance(layer_progress(FakeTerminal(), quiet=True), NoProgress)


def test_bars_render_each_layer_with_bytes_and_outcome() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    drive(layer_progress(out, console=console))
    text = out.getvalue()
    final = text.rsplit("\x1b[2K", 1)[-1]  # rich redraws in place; the last frame stays
    assert "\x1b[" in text  # drawn as a live display, not plain lines
    assert f"layer 1/3 sha256:{'a' * 12} applied" in final
    assert "2.0/2.0 MB" in final  # the applied layer's bytes, all of them
    assert f"layer 2/3 sha256:{'b' * 12} remote" in final
    assert "0.0/9.0 MB" in final  # served lazily: nothing fetched
    assert f"layer 3/3 sha256:{'c' * 12} exists" in final
    assert "/s" in final  # a rate column
