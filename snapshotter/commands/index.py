"""``lazysnap index IMAGE``: build a zTOC for each large gzip layer and push a SOCI index, so
that lazysnap (and soci-snapshotter) can pull the image lazily without converting it.

Layer blobs are never rewritten. v2 (the default, soci's current format) changes what the tag
names: an image index holding the image, with its manifest annotated, and the SOCI index. v1
leaves the tag alone and publishes the index as a referrer of the image manifest.

One line per layer, then what was pushed; ``--json`` prints one JSON document instead. Errors
are one line on stderr, exit code 1; the tag is written last, so a failed run leaves it as it
was.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from registry import host_platform, parse_platform, parse_reference
from snapshotter.commands._containerd_args import add_registry_arguments
from snapshotter.commands._registry_command import (
    RegistryCommand,
    registry_client,
    run_registry_command,
)
from snapshotter.convert.soci import (
    DEFAULT_MIN_LAYER_SIZE,
    IndexImageError,
    IndexOptions,
    IndexResult,
    LayerIndexReport,
    index_image,
)
from snapshotter.logs import setup_logging

NAME = "index"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+)\s*([a-zA-Z]*)\s*")
MIN_SPAN_SIZE = 64 * 1024  # smaller spans make a zTOC of mostly 32 KiB windows
MAX_SPAN_SIZE = 1024 * 2**20  # a read inflates up to a whole span into memory
# The same tag rule as the distribution spec's.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")


def parse_size(text: str) -> int:
    """``10MB``, ``4MiB``, ``4194304``: bytes, with decimal or binary units."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 10MB or 4MiB")
    return int(match.group(1)) * _UNITS[unit]


def _span_size(text: str) -> int:
    value = parse_size(text)
    if not MIN_SPAN_SIZE <= value <= MAX_SPAN_SIZE:
        raise argparse.ArgumentTypeError(
            f"span size must be between {MIN_SPAN_SIZE} and {MAX_SPAN_SIZE} bytes"
        )
    return value


def _tag(text: str) -> str:
    if not _TAG.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid tag")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image to index, e.g. host:5000/app:1")
    parser.add_argument(
        "--min-layer-size", type=parse_size, default=DEFAULT_MIN_LAYER_SIZE, metavar="SIZE",
        help="index only gzip layers at least this large (default: 10MiB, as soci)",
    )
    parser.add_argument(
        "--span-size", type=_span_size, default=4 * 2**20, metavar="SIZE",
        help="uncompressed bytes between two checkpoints of a zTOC (default: 4MiB)",
    )
    versions = parser.add_mutually_exclusive_group()
    versions.add_argument(
        "--v2", dest="version", action="store_const", const=2,
        help="SOCI index manifest v2 (default): the tag then names an image index holding the "
        "image, its manifest annotated with the index, and the index",
    )
    versions.add_argument(
        "--v1", dest="version", action="store_const", const=1,
        help="SOCI index manifest v1: a referrer of the image manifest; the tag is unchanged",
    )
    parser.set_defaults(version=2)
    parser.add_argument(
        "--tag", type=_tag, metavar="TAG",
        help="v2: tag of the same repository to write the indexed image to "
        "(default: IMAGE's own tag)",
    )
    parser.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]",
        help="platform to index from an image index (default: this machine)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default: warning)",
    )
    add_registry_arguments(parser)


def _options(args: argparse.Namespace) -> IndexOptions:
    if args.tag is not None and args.version == 1:
        raise IndexImageError("--tag is for v2: a v1 index leaves the tags alone")
    options = IndexOptions(
        version=args.version,
        platform=parse_platform(args.platform) if args.platform else host_platform(),
        min_layer_size=args.min_layer_size,
        span_size=args.span_size,
        tag=args.tag,
    )
    parse_reference(args.image)
    return options


async def _index(args: argparse.Namespace, options: IndexOptions) -> IndexResult:
    def report(layer: LayerIndexReport) -> None:
        if not args.json:
            print(layer.line(), flush=True)

    async with registry_client(args) as client:
        return await index_image(client, parse_reference(args.image), options, report)


def _layer_json(layer: LayerIndexReport) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "digest": layer.layer.digest,
        "mediaType": layer.layer.media_type,
        "size": layer.layer.size,
    }
    if layer.ztoc is None:
        doc["skipped"] = layer.skip_reason
        return doc
    doc["ztoc"] = {
        "digest": layer.ztoc.digest,
        "size": len(layer.ztoc.data),
        "spans": layer.ztoc.spans,
        "entries": layer.ztoc.entries,
        "uncompressedSize": layer.ztoc.uncompressed_size,
        "uploaded": layer.uploaded,
    }
    doc["downloadSeconds"] = round(layer.download_seconds, 3)
    doc["buildSeconds"] = round(layer.build_seconds, 3)
    return doc


def result_json(result: IndexResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": result.version,
        "manifest": result.manifest_digest,
        "platform": str(result.platform) if result.platform else None,
        "sociIndex": {"digest": result.index_digest, "size": result.index_size},
        "layers": [_layer_json(layer) for layer in result.layers],
    }
    if result.version == 2:
        doc["tag"] = str(result.tagged)
        doc["image"] = result.image_digest
        doc["annotatedManifest"] = result.enabled_manifest_digest
    else:
        doc["referrers"] = result.referrers
        doc["referrersTag"] = result.referrers_tag
    return doc


def _summary(args: argparse.Namespace, result: IndexResult) -> list[str]:
    built = [layer for layer in result.layers if layer.ztoc is not None]
    total = sum(len(layer.ztoc.data) for layer in built if layer.ztoc is not None)
    lines = [
        f"indexed {args.image}: {len(built)} of {len(result.layers)} layers, "
        f"{total / 1e3:.1f} kB of zTOCs",
        f"pushed SOCI index v{result.version} {result.index_digest}",
    ]
    if result.version == 2:
        lines.append(f"tagged {result.tagged} digest {result.image_digest} (SOCI-enabled image)")
    elif result.referrers == "tag":
        lines.append(f"listed as a referrer of {result.manifest_digest} under the referrers tag "
                     f"{result.referrers_tag} (the registry has no referrers API)")  # fmt: skip
    else:
        lines.append(f"listed as a referrer of {result.manifest_digest} by the registry")
    return lines


def _print_result(args: argparse.Namespace, result: IndexResult) -> int:
    if args.json:
        print(json.dumps(result_json(result), indent=2))
    else:
        print("\n".join(_summary(args, result)))
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    command = RegistryCommand(NAME, args.image, IndexImageError, unwritten="the tag")
    return run_registry_command(args, command, _options, _index, _print_result)
