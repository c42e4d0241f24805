"""``lazysnap inspect IMAGE``: the resolved digest, the platform manifest, and per layer its
digest, size, media type and whether lazysnap can pull it lazily."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import trio

from registry import (
    InvalidReferenceError,
    RegistryError,
    ResolvedImage,
    create_client,
    host_platform,
    parse_platform,
    parse_reference,
)
from snapshotter.lazy_formats import classify_layer

NAME = "inspect"
HELP = "show an image's manifest and whether its layers can be pulled lazily"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", metavar="IMAGE", help="image reference, e.g. busybox or host:5000/app:1"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="platform to pick from an index (default: this machine)",
    )
    parser.add_argument(
        "--hosts-dir",
        metavar="DIR",
        help="containerd-style hosts directory "
        "(default: $LAZYSNAP_HOSTS_DIR, else /etc/containerd/certs.d)",
    )


def _report(image: ResolvedImage) -> dict[str, Any]:
    layers = []
    for layer in image.manifest.layers:
        verdict = classify_layer(layer.media_type, layer.annotations)
        layers.append(
            {
                "digest": layer.digest,
                "size": layer.size,
                "media_type": layer.media_type,
                "lazy": verdict.lazy,
                "format": verdict.format,
                "reason": verdict.reason,
                "annotations": dict(layer.annotations),
            }
        )
    return {
        "reference": str(image.reference),
        "digest": image.digest,
        "media_type": image.media_type,
        "platform": str(image.platform) if image.platform else None,
        "manifest": {
            "digest": image.manifest_digest,
            "media_type": image.manifest.media_type,
            "config": {
                "digest": image.manifest.config.digest,
                "size": image.manifest.config.size,
                "media_type": image.manifest.config.media_type,
            },
            "annotations": dict(image.manifest.annotations),
        },
        "layers": layers,
    }


def _print_table(report: dict[str, Any], out: TextIO) -> None:
    manifest = report["manifest"]
    print(f"Reference:  {report['reference']}", file=out)
    print(f"Digest:     {report['digest']}  ({report['media_type']})", file=out)
    if report["platform"]:
        print(f"Platform:   {report['platform']}", file=out)
    print(f"Manifest:   {manifest['digest']}  ({manifest['media_type']})", file=out)
    config = manifest["config"]
    print(f"Config:     {config['digest']}  {config['size']} bytes", file=out)
    lazy_count = sum(1 for layer in report["layers"] if layer["lazy"])
    print(f"Layers:     {len(report['layers'])} ({lazy_count} lazily pullable)", file=out)
    for number, layer in enumerate(report["layers"]):
        verdict = layer["format"] or "no"
        print(
            f"  {number:>3}  {layer['digest']}  {layer['size']:>12}  {layer['media_type']}",
            file=out,
        )
        print(f"       lazy: {verdict} ({layer['reason']})", file=out)


async def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    reference = parse_reference(args.image)
    platform = parse_platform(args.platform) if args.platform else host_platform()
    async with create_client(args.hosts_dir) as client:
        image = await client.resolve_image(reference, platform)
    return _report(image)


def run(args: argparse.Namespace) -> int:
    try:
        report = trio.run(_inspect, args)
    except (InvalidReferenceError, ValueError) as exc:
        print(f"lazysnap inspect: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"lazysnap inspect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(report, sys.stdout)
    return 0
