"""``lazysnap convert SRC DST``: rewrite an image's layers as eStargz or zstd:chunked and push
the result so that lazysnap can pull it lazily. It uses OCI media types and keeps layer
annotations.

One line per layer, then the new manifest digest. Errors are one line on stderr, exit code 1;
the destination tag is written last, so a failed run leaves nothing under it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from fusefs import IndexLimits
from registry import Platform, host_platform, parse_platform, parse_reference
from snapshotter.commands._containerd_args import add_registry_arguments
from snapshotter.commands._registry_command import (
    RegistryCommand,
    registry_client,
    run_registry_command,
)
from snapshotter.convert.documents import (
    OCI_INDEX,
    TARGET_FORMATS,
    ConvertError,
    parse_target_format,
)
from snapshotter.convert.image import (
    ConvertOptions,
    ConvertResult,
    LayerReport,
    convert_image,
    normalize_prioritized,
)
from snapshotter.convert.optimize import DEFAULT_RUN_TIMEOUT, OptimizeSpec
from snapshotter.convert.progress import convert_progress
from snapshotter.logs import setup_logging

NAME = "convert"
MIN_CHUNK_SIZE = 4096
# lazysnap refuses to serve a layer with larger chunks (a read holds a whole chunk in memory).
MAX_CHUNK_SIZE = IndexLimits().max_chunk_size


def _chunk_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if value < MIN_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size must be at least {MIN_CHUNK_SIZE} bytes")
    if value > MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size must be at most {MAX_CHUNK_SIZE} bytes")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="image to read, e.g. host:5000/app:1")
    parser.add_argument("destination", metavar="DST", help="tag to push the result to")
    parser.add_argument(
        "--format", default="estargz", choices=TARGET_FORMATS,
        help="layer format to write (default: estargz)",
    )
    parser.add_argument(
        "--prioritize", action="append", default=[], metavar="PATH",
        help="put this file first in its layer, before the prefetch landmark (repeatable)",
    )
    platforms = parser.add_mutually_exclusive_group()
    platforms.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]",
        help="platform to convert from an index (default: this machine)",
    )
    platforms.add_argument(
        "--all-platforms", action="store_true",
        help="convert every platform of an index and push a new index",
    )
    parser.add_argument(
        "--chunk-size", type=_chunk_size, default=None, metavar="BYTES",
        help="largest chunk of a file the writer compresses on its own (default: 4 MiB)",
    )
    parser.add_argument(
        "--optimize", metavar="'CMD ...'",
        help="run CMD once in the image, lazily mounted (root, FUSE and runc needed), and put "
        "the files it read first, in that order",
    )
    parser.add_argument(
        "--optimize-timeout", type=float, default=DEFAULT_RUN_TIMEOUT, metavar="SECONDS",
        help="stop the --optimize command after this long (default: %(default)s)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the digest")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default: warning)",
    )
    add_registry_arguments(parser)


def _options(args: argparse.Namespace) -> ConvertOptions:
    options = ConvertOptions(
        format=parse_target_format(args.format),
        platform=parse_platform(args.platform) if args.platform else host_platform(),
        prioritized=normalize_prioritized(args.prioritize),
        all_platforms=args.all_platforms,
    )
    if args.chunk_size is not None:
        options = dataclasses.replace(options, chunk_size=args.chunk_size)
    if args.optimize is not None:
        try:
            command = tuple(shlex.split(args.optimize))
        except ValueError as exc:
            raise ConvertError(f"--optimize: {exc}") from None
        if not command:
            raise ConvertError("--optimize needs a command")
        if args.optimize_timeout <= 0:
            raise ConvertError("--optimize-timeout must be positive")
        spec = OptimizeSpec(command, args.optimize_timeout, args.hosts_dir)
        options = dataclasses.replace(options, optimize=spec)
    parse_reference(args.source)
    parse_reference(args.destination)
    return options


async def _convert(args: argparse.Namespace, options: ConvertOptions) -> ConvertResult:
    source = parse_reference(args.source)
    destination = parse_reference(args.destination)

    progress = None if args.quiet else convert_progress(sys.stdout)

    def report(layer: LayerReport) -> None:
        if progress is not None:
            progress.layer_done(layer.number, layer.total, layer.line(options.format))

    def platform(chosen: Platform | None) -> None:
        if options.all_platforms and chosen is not None and progress is not None:
            progress.say(f"platform {chosen}")

    def stage(text: str) -> None:
        if progress is not None:
            progress.say(text)

    try:
        async with registry_client(args) as client:
            return await convert_image(
                client, source, destination, options, report, platform, stage
            )
    finally:
        if progress is not None:
            progress.close()


def _print_result(args: argparse.Namespace, result: ConvertResult) -> int:
    if args.quiet:
        print(result.digest)
        return 0
    converted = sum(1 for layer in result.layers if layer.converted)
    print(
        f"converted {args.source} to {args.format}: {len(result.layers)} layers "
        f"({converted} converted, {len(result.layers) - converted} kept)"
    )
    index = f" (index of {len(result.platforms)} images)" if result.media_type == OCI_INDEX else ""
    print(f"pushed {result.destination} digest {result.digest}{index}")
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    command = RegistryCommand(NAME, args.source, ConvertError, unwritten="the destination tag")
    return run_registry_command(args, command, _options, _convert, _print_result)
