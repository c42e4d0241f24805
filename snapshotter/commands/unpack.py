"""``lazysnap unpack IMAGE``: unpack an image containerd already has, e.g. pulled for overlayfs,
into a snapshotter, with the per-layer labels containerd's CRI sends. Reads the image record,
manifest, config and layer blobs from containerd. With ``--fetch``, layer blobs containerd lacks
come from the image's registry, such as those of layers another snapshotter serves lazily."""

from __future__ import annotations

import argparse
import sys

import trio

from registry import (
    DockerConfigCredentials,
    Platform,
    RegistryClient,
    RegistryError,
    host_platform,
    parse_platform,
)
from snapshotter.client.containerd_client import ContainerdClient
from snapshotter.client.documents import ImageDocuments
from snapshotter.client.progress import LayerResult, Progress, layer_progress
from snapshotter.client.pull import unpack_existing, unpack_fetching
from snapshotter.commands._containerd_args import (
    add_containerd_arguments,
    add_registry_arguments,
    fail,
    hosts_config,
    summary,
)
from snapshotter.errors import SnapshotterError
from snapshotter.logs import setup_logging

NAME = "unpack"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_containerd_arguments(parser)
    parser.add_argument(
        "--fetch", action="store_true",
        help="fetch layer blobs missing from containerd's content store from the registry",
    )
    add_registry_arguments(parser)


async def _unpack_fetching(
    args: argparse.Namespace, client: ContainerdClient, platform: Platform, progress: Progress
) -> tuple[ImageDocuments, list[LayerResult]]:
    async with RegistryClient(
        hosts_config(args), DockerConfigCredentials()
    ) as registry:
        return await unpack_fetching(
            client, registry, args.image, args.snapshotter, platform, progress
        )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    progress = layer_progress(sys.stdout, quiet=args.quiet)
    try:
        platform = parse_platform(args.platform) if args.platform else host_platform()
        with ContainerdClient(args.address, args.namespace) as client:
            client.version()
            if args.fetch:
                image, results = trio.run(_unpack_fetching, args, client, platform, progress)
            else:
                image, results = unpack_existing(
                    client, args.image, args.snapshotter, platform, progress
                )
        progress.close()
    except (SnapshotterError, RegistryError, ValueError) as exc:
        progress.close()
        return fail(NAME, exc)
    except KeyboardInterrupt:
        progress.close()
        fail(NAME, "interrupted (containerd collects what was stored once its lease expires)")
        return 130
    if not args.quiet:
        print(summary(image.name, args.snapshotter, results))
    return 0
