"""``lazysnap mount``: serve one seekable layer blob read-only over FUSE, in the foreground.

    lazysnap mount --blob layer.esgz /mnt/layer [--cache-dir DIR] [--access-log FILE]

The blob's tree appears directly at MOUNTPOINT. Files are fetched (from the local blob) chunk by
chunk on first read, verified and cached; unless ``--no-background-fetch``, the whole blob is then
read in the background and checked against its digest. Runs until Ctrl-C, SIGTERM or an external
unmount (``fusermount3 -u MOUNTPOINT``), and always unmounts on the way out.

The image-reference form (``lazysnap mount IMAGE MOUNTPOINT``, layers merged with overlay) needs
the registry client and is not supported yet.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import trio

from fusefs import DEFAULT_CACHE_CAPACITY, LazyFilesystem, LocalFileBlob

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="image reference to mount (not yet supported; use --blob)",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="existing directory")
    parser.add_argument(
        "--blob", type=Path, metavar="PATH", help="a local eStargz or zstd:chunked layer blob"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="chunk cache directory, kept across runs (default: a temporary one, removed on exit)",
    )
    parser.add_argument(
        "--cache-size",
        type=int,
        default=DEFAULT_CACHE_CAPACITY,
        metavar="BYTES",
        help="chunk cache capacity in bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        type=Path,
        metavar="FILE",
        help="append one JSON line per first read of each file (path, offset, size, seconds)",
    )
    parser.add_argument(
        "--no-background-fetch",
        action="store_true",
        help="fetch only what is read (and the prefetch range), not the whole blob",
    )
    parser.add_argument(
        "--toc-digest",
        metavar="DIGEST",
        help="expected sha256 of the TOC (the containerd.io/snapshot/stargz/toc.digest value)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.blob is None:
        if args.source is None:
            return _usage("give --blob PATH (a local layer blob) or an image reference")
        return _usage(
            f"mounting an image reference ({args.source}) is not yet supported: it needs the "
            "registry client; mount a downloaded layer with --blob PATH instead"
        )
    if args.source is not None:
        return _usage("give either --blob PATH or an image reference, not both")
    if not args.blob.is_file():
        return _usage(f"blob not found: {args.blob}")
    if not args.mountpoint.is_dir():
        return _usage(f"mountpoint is not a directory: {args.mountpoint}")
    if args.cache_size <= 0:
        return _usage("--cache-size must be positive")
    temporary_cache = args.cache_dir is None
    cache_dir = (
        Path(tempfile.mkdtemp(prefix="lazysnap-cache-")) if temporary_cache else args.cache_dir
    )
    try:
        return trio.run(_serve, args, cache_dir)
    except KeyboardInterrupt:
        return 0
    finally:
        if temporary_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)


def _usage(message: str) -> int:
    print(f"lazysnap mount: error: {message}", file=sys.stderr)
    return EXIT_USAGE


async def _serve(args: argparse.Namespace, cache_dir: Path) -> int:
    # Imported here so that argument errors are reported without loading the formats.
    from fusefs.formats import LayerFormatError, load_layer_index  # noqa: PLC0415

    blob = await LocalFileBlob.open(args.blob.resolve())
    try:
        try:
            index = await load_layer_index(blob, toc_digest=args.toc_digest)
        except LayerFormatError as exc:
            print(f"lazysnap mount: error: {args.blob}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        fs = LazyFilesystem(
            args.mountpoint.resolve(),
            cache_dir,
            cache_capacity=args.cache_size,
            access_log=args.access_log,
            single_layer=True,
            allow_other=os.geteuid() == 0,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, fs)
            await nursery.start(_run_then_stop, fs, nursery.cancel_scope)
            await fs.attach(
                args.blob.name, blob, index, background_fetch=not args.no_background_fetch
            )
            print(
                f"lazysnap: mounted {args.blob} ({index.entry_count} entries) at "
                f"{args.mountpoint}; Ctrl-C or `fusermount3 -u {args.mountpoint}` to stop",
                file=sys.stderr,
                flush=True,
            )
        return 0
    finally:
        blob.close()


async def _run_then_stop(
    fs: LazyFilesystem,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await fs.run(task_status=task_status)
    scope.cancel()  # unmounted (from outside or by a signal): stop the signal watcher too


async def _stop_on_signal(fs: LazyFilesystem) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("stopping on signal=%s", signal.Signals(signum).name)
            fs.unmount()
            return
