"""``lazysnap mount``: serve one seekable layer blob read-only over FUSE, in the foreground.

    lazysnap mount --blob layer.esgz /mnt/layer [--cache-dir DIR] [--access-log FILE]

The blob's tree appears directly at MOUNTPOINT. Files are fetched from the local blob chunk by
chunk on first read, verified and cached; unless ``--no-background-fetch``, the whole blob is then
read in the background and checked against its digest. Runs until Ctrl-C, SIGTERM or an external
unmount such as ``fusermount3 -u MOUNTPOINT``, and always unmounts on the way out.

    lazysnap mount registry.example/app:1.0 /mnt/app [--platform linux/amd64]

The image form resolves the reference with the registry client, which takes its hosts from the
containerd-style hosts directory and its credentials from the docker config. It attaches every
layer as a directory of one private FUSE mount, and merges them read-only with overlayfs at
MOUNTPOINT. Every layer must be eStargz or zstd:chunked. A one-layer image is mounted directly.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from fusefs import DEFAULT_CACHE_CAPACITY, LazyFilesystem, LocalFileBlob

if TYPE_CHECKING:
    from snapshotter.daemon.metrics_server import MetricsServer

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="image reference to mount (its layers merged read-only), unless --blob is given",
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
    parser.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="image platform to pick from an index (default: this machine's)",
    )
    parser.add_argument(
        "--hosts-dir",
        metavar="DIR",
        help="containerd-style registry hosts directory (default: $LAZYSNAP_HOSTS_DIR or "
        "/etc/containerd/certs.d)",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="ADDRESS",
        help="serve Prometheus metrics of the mount at http://ADDRESS/metrics (HOST:PORT or "
        "unix:/path; --blob only), as the daemon does (docs/observability.md)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.blob is None and args.source is None:
        return _usage("give --blob PATH (a local layer blob) or an image reference")
    if args.blob is not None and args.source is not None:
        return _usage("give either --blob PATH or an image reference, not both")
    if args.blob is not None and not args.blob.is_file():
        return _usage(f"blob not found: {args.blob}")
    if not args.mountpoint.is_dir():
        return _usage(f"mountpoint is not a directory: {args.mountpoint}")
    if args.cache_size <= 0:
        return _usage("--cache-size must be positive")
    if args.metrics_address is not None:
        if args.blob is None:
            return _usage("--metrics-address needs --blob")
        from snapshotter.daemon.config import ConfigError, parse_metrics_address  # noqa: PLC0415

        try:
            parse_metrics_address(args.metrics_address, "--metrics-address")
        except ConfigError as exc:
            return _usage(str(exc))
    temporary_cache = args.cache_dir is None
    cache_dir = (
        Path(tempfile.mkdtemp(prefix="lazysnap-cache-")) if temporary_cache else args.cache_dir
    )
    serve = _serve_blob if args.blob is not None else _serve_image
    try:
        return trio.run(serve, args, cache_dir)
    except KeyboardInterrupt:
        return 0
    finally:
        if temporary_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)


def _usage(message: str) -> int:
    print(f"lazysnap mount: error: {message}", file=sys.stderr)
    return EXIT_USAGE


async def _serve_blob(args: argparse.Namespace, cache_dir: Path) -> int:
    # Imported here so that argument errors are reported without loading the formats.
    from fusefs import LayerFormatError, load_layer_index  # noqa: PLC0415

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
        async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
            if args.metrics_address is not None:
                metrics = await _start_metrics(args.metrics_address, fs)
                if metrics is None:
                    return EXIT_FAILED
                stack.push_async_callback(trio.to_thread.run_sync, metrics.close)
            nursery.start_soon(stop_on_signal, fs)
            await nursery.start(run_then_stop, fs, nursery.cancel_scope)
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


async def _start_metrics(address: str, fs: LazyFilesystem) -> MetricsServer | None:
    """The daemon's /metrics for this one mount; None (said on stderr) if it cannot listen."""
    from snapshotter.daemon.metrics import (  # noqa: PLC0415
        DaemonSnapshot,
        from_trio,
        metrics_registry,
    )
    from snapshotter.daemon.metrics_server import (  # noqa: PLC0415
        MetricsServerError,
        start_metrics_server,
    )
    from snapshotter.version import VERSION  # noqa: PLC0415

    def take() -> DaemonSnapshot:
        return DaemonSnapshot(VERSION, lazy=True, fs=fs.snapshot())

    registry = metrics_registry(from_trio(take, trio.lowlevel.current_trio_token()),
                                per_layer=True)
    try:
        return await trio.to_thread.run_sync(start_metrics_server, address, registry)
    except MetricsServerError as exc:
        print(f"lazysnap mount: error: {exc}", file=sys.stderr)
        return None


async def run_then_stop(
    fs: LazyFilesystem,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    await fs.run(task_status=task_status)
    scope.cancel()  # unmounted from outside or by a signal: stop the signal watcher too


async def stop_on_signal(
    fs: LazyFilesystem, before: list[Callable[[], Awaitable[None]]] | None = None
) -> None:
    """On SIGINT/SIGTERM: run ``before``, e.g. to unmount an overlay on top, then unmount."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("stopping on signal=%s", signal.Signals(signum).name)
            for step in before or ():
                await step()
            fs.unmount()
            return


# -- the image form --------------------------------------------------------------------------


async def _serve_image(args: argparse.Namespace, cache_dir: Path) -> int:
    from fusefs import LayerFormatError  # noqa: PLC0415
    from registry import (  # noqa: PLC0415
        DockerConfigCredentials,
        HostsConfig,
        RegistryClient,
        RegistryError,
        parse_platform,
        parse_reference,
    )
    from snapshotter.remote.open_layer import open_layer  # noqa: PLC0415

    try:
        ref = parse_reference(args.source)
        platform = parse_platform(args.platform) if args.platform else None
    except (RegistryError, ValueError) as exc:
        return _usage(str(exc))
    mountpoint: Path = args.mountpoint.resolve()
    private = Path(await trio.to_thread.run_sync(tempfile.mkdtemp, None, "lazysnap-mount-"))
    try:
        async with RegistryClient(HostsConfig(args.hosts_dir), DockerConfigCredentials()) as client:
            try:
                image = await client.resolve_image(ref, platform)
                layers = []
                for number, descriptor in enumerate(image.manifest.layers):
                    try:
                        opened = await open_layer(client, ref, descriptor.digest,
                                                  dict(descriptor.annotations),
                                                  size=descriptor.size)
                    except LayerFormatError as exc:
                        print(
                            f"lazysnap mount: error: layer {number} ({descriptor.digest}, "
                            f"{descriptor.media_type}) cannot be mounted lazily: {exc}",
                            file=sys.stderr,
                        )
                        return EXIT_FAILED
                    layer_id = f"{number:03d}-{descriptor.digest.partition(':')[2][:12]}"
                    layers.append((layer_id, opened.blob, opened.index))
            except RegistryError as exc:
                print(f"lazysnap mount: error: {args.source}: {exc}", file=sys.stderr)
                return EXIT_FAILED
            if not layers:
                print(f"lazysnap mount: error: {args.source} has no layers", file=sys.stderr)
                return EXIT_FAILED
            single = len(layers) == 1
            fuse_dir = mountpoint if single else private / "fuse"
            await trio.Path(private / "fuse").mkdir()
            fs = LazyFilesystem(
                fuse_dir,
                cache_dir,
                cache_capacity=args.cache_size,
                access_log=args.access_log,
                single_layer=single,
                allow_other=os.geteuid() == 0,
            )
            before_unmount: list[Callable[[], Awaitable[None]]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_signal, fs, before_unmount)
                await nursery.start(run_then_stop, fs, nursery.cancel_scope)
                lowers = [
                    await fs.attach(
                        layer_id, blob, index, background_fetch=not args.no_background_fetch
                    )
                    for layer_id, blob, index in layers
                ]
                if not single:
                    # Top layer first; a separate process mounts, as ours serves the lowers.
                    options = "ro,lowerdir=" + ":".join(str(p) for p in reversed(lowers))
                    await trio.run_process(
                        ["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)]
                    )
                    before_unmount.append(lambda: _unmount_overlay(mountpoint))
                    nursery.start_soon(_stop_when_unmounted, fs, mountpoint)
                print(
                    f"lazysnap: mounted {args.source} ({len(layers)} layers) at {mountpoint}; "
                    f"Ctrl-C or `umount {mountpoint}` to stop",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    await trio.sleep_forever()
                finally:
                    if not single:
                        with trio.CancelScope(shield=True):
                            await _unmount_overlay(mountpoint)
        return 0
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, private, True)


def _is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == target for line in f)


async def _stop_when_unmounted(fs: LazyFilesystem, mountpoint: Path) -> None:
    """The overlay at MOUNTPOINT was unmounted from outside: stop as after Ctrl-C."""
    while True:
        if not await trio.to_thread.run_sync(_is_mounted, mountpoint):
            break
        await trio.sleep(0.5)
    log.info("overlay unmounted from outside mountpoint=%s", mountpoint)
    fs.unmount()


async def _unmount_overlay(mountpoint: Path) -> None:
    if await trio.to_thread.run_sync(_is_mounted, mountpoint):
        # Lazily: a process still inside the tree must not keep the FUSE server alive.
        await trio.run_process(["umount", "-l", str(mountpoint)], check=False)
