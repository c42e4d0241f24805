"""Arguments and error reporting shared by ``lazysnap pull`` and ``lazysnap unpack``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.client.progress import LayerResult

if TYPE_CHECKING:
    from registry import HostsConfig

# Neither ``registry`` nor the containerd client is imported here: their imports dominate the
# start-up of ``lazysnap pull --snapshotter-address``, which reaches its first RPC without them.
DEFAULT_SNAPSHOTTER = "lazysnap"
DEFAULT_CONTAINERD_ADDRESS = Path("/run/containerd/containerd.sock")  # containerd_client's default


def add_containerd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", metavar="IMAGE", help="image reference, e.g. busybox or host:5000/app:1"
    )
    parser.add_argument(
        "--snapshotter", default=DEFAULT_SNAPSHOTTER,
        help=f"containerd snapshotter to unpack into (default: {DEFAULT_SNAPSHOTTER})",
    )
    parser.add_argument(
        "--namespace", "-n", default="default", help="containerd namespace (default: default)"
    )
    parser.add_argument(
        "--address", default=str(DEFAULT_CONTAINERD_ADDRESS),
        help=f"containerd's socket (default: {DEFAULT_CONTAINERD_ADDRESS})",
    )
    parser.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]",
        help="platform to pick from an index (default: this machine)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default: warning)",
    )


def add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hosts-dir", metavar="DIR",
        help="containerd-style registry hosts directory "
        "(default: $LAZYSNAP_HOSTS_DIR, else /etc/containerd/certs.d)",
    )
    parser.add_argument(
        "--plain-http", action="store_true",
        help="talk plain HTTP to every registry host (loopback registries always use it)",
    )


def __getattr__(name: str) -> Any:
    # ``PlainHTTPHosts`` used to live here; its module imports ``registry``, so on demand only.
    if name == "PlainHTTPHosts":
        from snapshotter.commands._plain_http import PlainHTTPHosts  # noqa: PLC0415

        return PlainHTTPHosts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hosts_config(args: argparse.Namespace) -> HostsConfig:
    from registry import HostsConfig  # noqa: PLC0415 (see DEFAULT_SNAPSHOTTER)
    from snapshotter.commands._plain_http import PlainHTTPHosts  # noqa: PLC0415

    if args.plain_http:
        return PlainHTTPHosts(args.hosts_dir)
    return HostsConfig(args.hosts_dir)


def fail(command: str, message: object) -> int:
    """One line on stderr, exit code 1."""
    text = " ".join(str(message).split())
    print(f"lazysnap {command}: {text}", file=sys.stderr)
    return 1


def summary(image: str, snapshotter: str, results: Sequence[LayerResult]) -> str:
    counts = {outcome: sum(1 for r in results if r.outcome == outcome)
              for outcome in ("remote", "applied", "exists")}
    return (
        f"unpacked {image} into {snapshotter}: {len(results)} layers "
        f"({counts['remote']} remote, {counts['applied']} applied, {counts['exists']} existing)"
    )
