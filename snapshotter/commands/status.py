"""``lazysnap status``: is the daemon answering? Exit 0 if healthy, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.daemon.config import DEFAULT_ADDRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=str(DEFAULT_ADDRESS), help="the daemon's socket")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        with grpc.insecure_channel(f"unix:{args.address}") as channel:
            reply = daemon_pb2_grpc.DaemonStub(channel).Status(
                daemon_pb2.StatusRequest(), timeout=args.timeout
            )
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
    if args.json:
        print(json.dumps(status))
    else:
        print(f"healthy: lazysnap {reply.version} pid {reply.pid} root {reply.root}, "
              f"up {status['uptime_seconds']}s, snapshots: {reply.snapshots_committed} committed, "
              f"{reply.snapshots_active} active, {reply.snapshots_view} views")
        if reply.kata_guest_pull_mount_type:
            print(f"kata guest pull: on ({reply.kata_guest_pull_mount_type})")
    return 0
