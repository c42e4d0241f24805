"""``lazysnap status --layers`` rendering: a table on a terminal, key=value lines otherwise."""

from __future__ import annotations

import pytest

from snapshotter._proto import daemon_pb2
from snapshotter.commands.status import layers_status, print_layers

DIGEST = "sha256:" + "ab" * 32


def _reply() -> daemon_pb2.LayersResponse:
    reply = daemon_pb2.LayersResponse(mode="lazy", cache_bytes=3 << 20,
                                      cache_capacity_bytes=10 << 30,
                                      config={"background_fetch": "false"})
    reply.layers.add(layer_id="r1", image="reg:5000/app:1", digest=DIGEST, format="estargz",
                     size=4 << 20, fetched_bytes=1 << 20, registry_bytes=(1 << 20) + 4096,
                     cached_bytes=2 << 20, on_demand_bytes=768 << 10, prefetch_bytes=256 << 10,
                     verification="chunks-only", last_error="read: FetchError: boom")
    return reply


def test_json_has_every_field_and_the_share_fetched() -> None:
    [layer] = layers_status(_reply())["layers"]
    assert layer["fetched_percent"] == 25.1  # footer and TOC reads included
    assert layer["on_demand_bytes"] + layer["prefetch_bytes"] == layer["fetched_bytes"]
    assert layer["last_error"] == "read: FetchError: boom"


def test_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    print_layers(layers_status(_reply()), rich_table=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mode: lazy; cache 3.0 MiB of 10.0 GiB"
    assert lines[1] == "config: background_fetch=false"
    assert lines[2].startswith("image=reg:5000/app:1  digest=abababababab  format=estargz  ")
    assert 'fetched="1.0 MiB / 4.0 MiB (25%)"' in lines[2]
    assert 'last_error="read: FetchError: boom"' in lines[2]


def test_a_table_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # the terminal's width
    print_layers(layers_status(_reply()), rich_table=True)
    out = capsys.readouterr().out
    header, row = (line for line in out.splitlines() if "│" in line or "┃" in line)
    assert "verification" in header and "on demand / prefetch / background" in header
    assert "abababababab" in row and "chunks-only" in row and "1.0 MiB / 4.0 MiB (25%)" in row
    assert "768.0 KiB / 256.0 KiB / 0 B" in row
    assert out.splitlines()[-1] == "abababababab last error: read: FetchError: boom"


def test_no_layers_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    print_layers(layers_status(daemon_pb2.LayersResponse(mode="lazy")), rich_table=False)
    assert capsys.readouterr().out.splitlines()[-1] == "no lazily attached layers"
