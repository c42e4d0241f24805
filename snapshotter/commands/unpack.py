"""``lazysnap unpack IMAGE``: unpack an image containerd already has (e.g. pulled for overlayfs)
into a snapshotter, with the per-layer labels containerd's CRI sends. Reads the image record,
manifest and config from containerd; fetches nothing."""

from __future__ import annotations

import argparse
import sys

from registry import RegistryError, host_platform, parse_platform
from snapshotter.commands._containerd_args import add_containerd_arguments, fail, summary
from snapshotter.containerd_client import ContainerdClient
from snapshotter.errors import SnapshotterError
from snapshotter.image_pull import unpack_existing
from snapshotter.logs import setup_logging
from snapshotter.progress import NoProgress, Progress, TextProgress

NAME = "unpack"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_containerd_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    progress: Progress = NoProgress() if args.quiet else TextProgress(sys.stdout)
    try:
        platform = parse_platform(args.platform) if args.platform else host_platform()
        with ContainerdClient(args.address, args.namespace) as client:
            client.version()
            image, results = unpack_existing(
                client, args.image, args.snapshotter, platform, progress
            )
    except (SnapshotterError, RegistryError, ValueError) as exc:
        return fail(NAME, exc)
    if not args.quiet:
        print(summary(image.name, args.snapshotter, results))
    return 0
