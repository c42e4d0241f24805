"""``lazysnap serve``: run the snapshotter daemon."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapshotter.daemon.config import LOG_LEVELS, ConfigError, load_config, with_overrides
from snapshotter.daemon.main import StartupError, serve
from snapshotter.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file (default /etc/lazysnap/config.toml)")
    parser.add_argument("--root", help="state directory (default /var/lib/lazysnap)")
    parser.add_argument("--address", help="gRPC socket (default /run/lazysnap/lazysnap.sock)")
    parser.add_argument("--hosts-dir", help="registry hosts.toml directory")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    parser.add_argument(
        "--keep-mounted-on-stop", action="store_true", default=None,
        help="on SIGTERM leave the lazy layers' FUSE connection to the fuse keeper, so running "
        "containers' reads resume when the next daemon starts (lazy.keep_mounted_on_stop)",
    )
    parser.add_argument(
        "--kata-guest-pull", action="store_true", default=None,
        help="Kata guest image pulling: container rootfs mounts tell Kata to pull the image in "
        "the guest, and the host mounts them lazily through nydus-overlayfs-lazysnap "
        "(kata.guest_pull; docs/kata.md)",
    )
    parser.add_argument(
        "--cri-image-service", metavar="SOCK",
        help="serve a CRI image service proxy on SOCK for kubelet's --image-service-endpoint: "
        "it forwards to containerd (cri.containerd_address) and keeps pull credentials for lazy "
        "reads (cri.image_service_address; docs/kubernetes.md)",
    )


    parser.add_argument(
        "--metrics-address", metavar="ADDRESS",
        help="serve Prometheus metrics at http://ADDRESS/metrics: HOST:PORT or "
        "unix:/absolute/path (metrics.address; off by default; docs/observability.md)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = with_overrides(
            load_config(args.config), root=args.root, address=args.address,
            hosts_dir=args.hosts_dir, log_level=args.log_level,
            keep_mounted_on_stop=args.keep_mounted_on_stop,
            kata_guest_pull=args.kata_guest_pull, cri_image_service=args.cri_image_service,
            metrics_address=args.metrics_address,
        )
    except ConfigError as exc:
        print(f"lazysnap: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    try:
        return serve(config)
    except StartupError as exc:
        print(f"lazysnap: cannot start: {exc}", file=sys.stderr)
        return 1
