"""``lazysnap status``: is the daemon answering? Exit 0 if healthy, 1 otherwise.

``--layers`` adds every lazily attached layer: how much of it was fetched, on demand or in the
background, what the cache holds, whether it is verified and its last error; a table on a
terminal, plain lines otherwise, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.daemon.config import DEFAULT_ADDRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=str(DEFAULT_ADDRESS), help="the daemon's socket")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--layers", action="store_true",
                        help="also show each lazily attached layer and the daemon's mode")


def run(args: argparse.Namespace) -> int:
    layers = None
    try:
        with grpc.insecure_channel(f"unix:{args.address}") as channel:
            stub = daemon_pb2_grpc.DaemonStub(channel)
            reply = stub.Status(daemon_pb2.StatusRequest(), timeout=args.timeout)
            if args.layers:
                layers = stub.Layers(daemon_pb2.LayersRequest(), timeout=args.timeout)
    except grpc.RpcError as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"lazysnap: daemon at {args.address} is not healthy: {detail}", file=sys.stderr)
        return 1
    status = {
        "healthy": True,
        "version": reply.version,
        "root": reply.root,
        "pid": reply.pid,
        "uptime_seconds": round(reply.uptime_seconds, 1),
        "snapshots": {
            "active": reply.snapshots_active,
            "committed": reply.snapshots_committed,
            "view": reply.snapshots_view,
        },
        "kata_guest_pull": {
            "enabled": bool(reply.kata_guest_pull_mount_type),
            "mount_type": reply.kata_guest_pull_mount_type,
        },
    }
    if layers is not None:
        status["lazy"] = layers_status(layers)
    if args.json:
        print(json.dumps(status))
    else:
        print(f"healthy: lazysnap {reply.version} pid {reply.pid} root {reply.root}, "
              f"up {status['uptime_seconds']}s, snapshots: {reply.snapshots_committed} committed, "
              f"{reply.snapshots_active} active, {reply.snapshots_view} views")
        if reply.kata_guest_pull_mount_type:
            print(f"kata guest pull: on ({reply.kata_guest_pull_mount_type})")
        if layers is not None:
            print_layers(status["lazy"], rich_table=sys.stdout.isatty())
    return 0


def layers_status(reply: Any) -> dict[str, Any]:
    """The ``Daemon/Layers`` answer as plain data, which ``--json`` prints."""
    return {
        "mode": reply.mode,
        "config": dict(sorted(reply.config.items())),
        "cache": {"bytes": reply.cache_bytes, "capacity_bytes": reply.cache_capacity_bytes},
        "layers": [
            {
                "layer_id": layer.layer_id, "image": layer.image, "digest": layer.digest,
                "format": layer.format, "size": layer.size,
                "fetched_bytes": layer.fetched_bytes,
                "fetched_percent": _percent(layer.registry_bytes, layer.size),
                "cached_bytes": layer.cached_bytes, "on_demand_bytes": layer.on_demand_bytes,
                "prefetch_bytes": layer.prefetch_bytes,
                "background_bytes": layer.background_bytes,
                "verification": layer.verification,
                "chunk_verify_failures": layer.chunk_verify_failures,
                "errors": layer.errors, "last_error": layer.last_error,
                "registry_bytes": layer.registry_bytes,
            }
            for layer in reply.layers
        ],
    }


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


TABLE_COLUMNS = ("image", "digest", "format", "fetched / size", "cached",
                 "on demand / prefetch / background", "verification")


def _row(layer: dict[str, Any]) -> tuple[str, ...]:
    return (
        layer["image"] or "-",
        layer["digest"].removeprefix("sha256:")[:12],
        layer["format"],
        f"{_size(layer['registry_bytes'])} / {_size(layer['size'])} "
        f"({layer['fetched_percent']:.0f}%)",
        _size(layer["cached_bytes"]),
        _size(layer["on_demand_bytes"]),
        _size(layer["prefetch_bytes"]),
        _size(layer["background_bytes"]),
        layer["verification"],
        layer["last_error"] or "-",
    )


def print_layers(lazy: dict[str, Any], *, rich_table: bool) -> None:
    cache = lazy["cache"]
    print(f"mode: {lazy['mode']}; cache {_size(cache['bytes'])} of "
          f"{_size(cache['capacity_bytes'])}")
    print("config: " + ", ".join(f"{key}={value}" for key, value in lazy["config"].items()))
    if not lazy["layers"]:
        print("no lazily attached layers")
        return
    if rich_table:
        table = Table(*TABLE_COLUMNS)
        for layer in lazy["layers"]:
            image, digest, fmt, fetched, cached, demand, prefetch, background, verified, _ = (
                _row(layer)
            )
            table.add_row(image, digest, fmt, fetched, cached,
                          f"{demand} / {prefetch} / {background}", verified)
        Console().print(table)
        for layer in lazy["layers"]:
            if layer["last_error"]:
                print(f"{_row(layer)[1]} last error: {layer['last_error']}")
        return
    for layer in lazy["layers"]:
        print("  ".join(f"{name}={value}" for name, value in
                        zip(("image", "digest", "format", "fetched", "cached", "on_demand",
                             "prefetch", "background", "verification", "last_error"),
                            (_quoted(v) for v in _row(layer)), strict=True)))


def _quoted(value: str) -> str:
    return json.dumps(value) if " " in value or not value else value
