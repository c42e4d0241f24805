"""The composition root: build the snapshotter, the lazy filesystem and the registry client,
serve gRPC, and run trio on the main thread.

grpcio's async API is asyncio-only, so the gRPC server is the synchronous one on a thread pool;
the main thread runs ``trio.run``: the FUSE session, registry fetches and background fetch live
there, and it waits for SIGTERM/SIGINT. RPCs reach trio through ``TrioBridge`` (one hop per call).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import trio

from fusefs import TRACE, FetchConfig, LazyFilesystem, SlotMarkError
from registry import (
    ClientOptions,
    CredentialProvider,
    DockerConfigCredentials,
    HostsConfig,
    RegistryClient,
)
from snapshotter.client.containerd_client import ContainerdClient
from snapshotter.daemon import keeper as fuse_keeper
from snapshotter.daemon.config import NEARBY_SPAN, Config, LazyConfig, default_kata_helper
from snapshotter.daemon.cri_credentials import CriCredentials
from snapshotter.daemon.cri_proxy import ImageServiceProxy, proxy_server, upstream_channel
from snapshotter.daemon.cri_pulled import PulledImages
from snapshotter.daemon.grpc_metrics import GrpcStats, MetricsInterceptor
from snapshotter.daemon.grpc_service import DaemonSummary, add_services
from snapshotter.daemon.index_publish import IndexPublisher
from snapshotter.daemon.kubelet_credentials import KubeletCredentials, StartSoon
from snapshotter.daemon.kubelet_provider_config import ProviderConfigError, load_provider_config
from snapshotter.daemon.metrics import DaemonSnapshot, from_trio, metrics_registry
from snapshotter.daemon.metrics_server import (
    MetricsServer,
    MetricsServerError,
    start_metrics_server,
)
from snapshotter.daemon.profile_publish import ProfilePublisher
from snapshotter.daemon.pushed_credentials import PushedCredentials
from snapshotter.daemon.sdnotify import notify
from snapshotter.daemon.socket_path import SocketError, prepare_socket_path
from snapshotter.remote.bridge import TrioBridge
from snapshotter.remote.layers import LazyLayers
from snapshotter.store.guest_pull import GuestPull, mount_type
from snapshotter.store.layout import Layout
from snapshotter.store.metadata import MetadataError
from snapshotter.store.snapshots import Snapshotter
from snapshotter.version import VERSION

log = logging.getLogger(__name__)


def read_path_config(lazy: LazyConfig) -> FetchConfig:
    """The read path's tuning from ``[lazy]``: the keys an operator sets, defaults for the rest."""
    return FetchConfig(
        read_deadline=lazy.read_deadline,
        long_read_bytes=lazy.long_read_bytes,
        background_yield=lazy.background_yield,
        background_ranges=lazy.background_ranges,
        nearby_span=NEARBY_SPAN if lazy.nearby_fetch else 0,
        exec_prefetch_depth=lazy.exec_prefetch_depth,
        exec_prefetch_concurrency=lazy.exec_prefetch_concurrency,
    )


MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # containerd's own limit
GRPC_WORKERS = 16
SHUTDOWN_GRACE_SECONDS = 10.0


class StartupError(Exception):
    """The daemon cannot start; the message is meant for the operator."""


def _guest_pull(config: Config) -> GuestPull | None:
    """Kata guest-pull mode, with the helper checked now rather than at a container's start."""
    if not config.kata.guest_pull:
        return None
    helper = config.kata.mount_helper or default_kata_helper()
    if not os.access(helper, os.X_OK):
        raise StartupError(f"kata guest pull: the mount helper {helper} is not an executable "
                           "file (install lazysnap's nydus-overlayfs-lazysnap or set "
                           "kata.mount_helper)")
    try:
        return GuestPull(mount_type(str(helper)))
    except ValueError as exc:
        raise StartupError(f"kata guest pull: {exc}") from None


def _open_snapshotter(root: Path, guest_pull: GuestPull | None) -> Snapshotter:
    try:
        return Snapshotter(root, guest_pull=guest_pull)
    except PermissionError as exc:
        raise StartupError(f"state root {root} is not writable: {exc.strerror}") from None
    except OSError as exc:
        raise StartupError(f"cannot use state root {root}: {exc.strerror or exc}") from None
    except MetadataError as exc:
        raise StartupError(str(exc)) from None


def _start_server(
    snapshotter: Snapshotter, address: Path, lazy: LazySide | None,
    grpc_stats: GrpcStats | None = None, summary: DaemonSummary | None = None,
    publisher: IndexPublisher | None = None,
) -> grpc.Server:
    try:
        prepare_socket_path(address)
    except SocketError as exc:
        raise StartupError(str(exc)) from None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
        interceptors=[] if grpc_stats is None else [MetricsInterceptor(grpc_stats)],
    )
    if lazy is None:
        add_services(server, snapshotter, summary=summary)
    else:
        add_services(server, snapshotter, lazy.credentials, lazy.bridge, TRACE, summary,
                     publisher)
    _listen(server, address)
    server.start()
    return server


def _listen(server: grpc.Server, address: Path) -> None:
    old_umask = os.umask(0o117)  # the socket is born 0660, never briefly world-accessible
    try:
        bound = server.add_insecure_port(f"unix:{address}")
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    finally:
        os.umask(old_umask)
    if not bound:
        raise StartupError(f"cannot listen on {address}")
    os.chmod(address, 0o660)


@dataclass(frozen=True, slots=True)
class CriProxy:
    """The CRI image service proxy's server and its channel to containerd."""

    server: grpc.Server
    channel: grpc.Channel
    address: Path
    pulled: PulledImages | None  # [index] publish's lookups of pulled images


def _start_cri_proxy(
    config: Config, store: CriCredentials, lazy: LazySide | None,
    publisher: IndexPublisher | None,
) -> CriProxy:
    address = config.cri.image_service_address
    assert address is not None
    try:
        prepare_socket_path(address)
    except SocketError as exc:
        raise StartupError(f"cri image service: {exc}") from None
    channel = upstream_channel(str(config.cri.containerd_address))
    verify = None if lazy is None else lazy.bridge.check_access
    pulled = None
    if publisher is not None:
        containerd = config.cri.containerd_address
        pulled = PulledImages(lambda namespace: ContainerdClient(containerd, namespace),
                              publisher.request)
    server = proxy_server(ImageServiceProxy(
        channel, store, verify, None if pulled is None else pulled.pulled
    ))
    try:
        _listen(server, address)
    except StartupError:
        channel.close()
        if pulled is not None:
            pulled.close()
        raise
    server.start()
    return CriProxy(server, channel, address, pulled)


def _stop_cri_proxy(proxy: CriProxy) -> None:
    proxy.server.stop(SHUTDOWN_GRACE_SECONDS).wait()
    proxy.channel.close()
    if proxy.pulled is not None:
        proxy.pulled.close()
    with contextlib.suppress(FileNotFoundError):
        proxy.address.unlink()


def _cri_credentials(config: Config, fallback: CredentialProvider) -> CriCredentials | None:
    """The store of CRI-captured credentials, loaded from its file; None without the proxy."""
    if config.cri.image_service_address is None:
        return None
    store = CriCredentials(config.cri_credentials_file, fallback)
    store.load()
    return store


def _kubelet_credentials(
    config: Config, fallback: CredentialProvider, start_soon: StartSoon
) -> KubeletCredentials | None:
    """kubelet's credential provider plugins, when configured. A file that cannot be used is
    logged and the daemon runs without them: lazy reads must not all stop for it."""
    path, bin_dir = config.cri.credential_provider_config, config.cri.credential_provider_bin_dir
    if path is None or bin_dir is None:
        return None
    try:
        loaded = load_provider_config(path)
    except ProviderConfigError as exc:
        log.error("credential provider config unusable; no credential providers",
                  extra={"path": str(path), "reason": str(exc)})
        return None
    for name, reason in loaded.skipped:
        log.error("credential provider left out", extra={"provider": name, "reason": reason})
    for provider in loaded.providers:
        if not os.access(bin_dir / provider.name, os.X_OK):
            # Looked up again at each use: it may be installed later.
            log.warning("credential provider plugin not found or not executable",
                        extra={"provider": provider.name, "bin_dir": str(bin_dir)})
    log.info("credential providers configured",
             extra={"path": str(path), "providers": [p.name for p in loaded.providers]})
    return KubeletCredentials(loaded.providers, bin_dir, fallback, start_soon=start_soon)


def _check_socket(address: Path) -> None:
    try:
        prepare_socket_path(address)
    except SocketError as exc:
        raise StartupError(str(exc)) from None


def _clear_stale_mount(mountpoint: Path) -> None:
    """A killed daemon leaves its FUSE mount behind, answering "transport endpoint is not
    connected"."""
    try:
        os.stat(mountpoint)
        return
    except FileNotFoundError:
        mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    except OSError:
        pass
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                   capture_output=True, timeout=30)
    subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True,
                   timeout=30)


def _start_keeper(fs: LazyFilesystem, socket_path: Path, mountpoint: Path) -> None:
    """Hand a copy of the new connection to a keeper, so a crash does not end it."""
    try:
        fd = fs.dup_device_fd()
    except RuntimeError as exc:
        log.warning("no fuse keeper: running containers will not survive a crash: %s", exc)
        return
    try:
        fuse_keeper.start_keeper(socket_path, fd, mountpoint)
    except (OSError, RuntimeError) as exc:
        log.warning("no fuse keeper: running containers will not survive a crash: %r", exc)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class LazySide:
    """What serves layers lazily, once the FUSE mount is up."""

    fs: LazyFilesystem
    client: RegistryClient
    bridge: TrioBridge
    credentials: PushedCredentials
    layers: LazyLayers


async def _start_lazy(
    config: Config, snapshotter: Snapshotter, nursery: trio.Nursery,
    credentials: PushedCredentials,
) -> LazySide | None:
    """Mount the FUSE filesystem and re-attach remote layers; None when FUSE is unavailable."""
    if not config.lazy.enabled:
        log.info("lazy pulling disabled by configuration")
        return None
    layout = snapshotter.layout
    if not await trio.Path("/dev/fuse").exists():
        log.warning("lazy pulling unavailable: /dev/fuse is missing; serving ordinary snapshots")
        return None
    keeper = fuse_keeper.keeper_socket(layout.root)
    # A keeper still holding the connection of the mount at layout.fuse (the previous daemon
    # crashed): serve that connection, so running containers' reads resume. Otherwise mount.
    handover = await trio.to_thread.run_sync(fuse_keeper.take_over, keeper, layout.fuse)
    if handover is None:
        await trio.to_thread.run_sync(_clear_stale_mount, layout.fuse)
    try:
        fs = LazyFilesystem(layout.fuse, layout.cache,
                            cache_capacity=config.lazy.cache_capacity,
                            config=read_path_config(config.lazy),
                            adopt_fd=None if handover is None else handover.fd,
                            slot_mark=layout.slot_mark,
                            passthrough=config.fuse.passthrough == "auto",
                            passthrough_handover=_passthrough_note(handover),
                            record_first_reads=(config.profile.record_seconds,
                                                config.profile.max_files)
                            if config.profile.publish else None)
    except SlotMarkError as exc:
        # Serving the running containers' connection without it could give a removed layer's
        # inode numbers to another layer; stop here for the operator instead.
        raise StartupError(f"{exc}; to start over, stop the containers using {layout.fuse}, "
                           "unmount it and remove the file") from None
    try:
        await nursery.start(fs.run)
    except (OSError, RuntimeError) as exc:
        log.warning("lazy pulling unavailable: cannot mount %s: %s", layout.fuse, exc)
        return None
    if handover is None:
        await trio.to_thread.run_sync(_start_keeper, fs, keeper, layout.fuse)
    else:
        log.info("fuse connection taken over from the keeper",
                 extra={"event": "fuse_takeover", "keeper_pid": handover.keeper_pid,
                        "device": handover.device})
    options = ClientOptions(mirror_first_byte_timeout=config.registry.mirror_first_byte_timeout)
    client = RegistryClient(HostsConfig(config.hosts_dir), credentials, options)
    nursery.start_soon(client.warm_up)  # the CA bundle, before the first pull needs it
    layers = LazyLayers(fs, client, layout.tail, background_fetch=config.lazy.background_fetch,
                        use_profiles=config.profile.prefetch)
    # Restoring reads only local files (saved TOC ranges): startup never waits on a registry.
    async with trio.open_nursery() as restoring:
        for record in await trio.to_thread.run_sync(snapshotter.remote_layer_records):
            restoring.start_soon(layers.restore, record)
    # Adopted connection: the kernel's queued requests are answered only now that every layer
    # is back at its slot, with the inode numbers the kernel already holds.
    fs.resume()
    bridge = TrioBridge(layers, trio.lowlevel.current_trio_token())
    snapshotter.enable_remote(bridge)
    return LazySide(fs, client, bridge, credentials, layers)


def _index_publisher(
    config: Config, lazy: LazySide | None, layout: Layout
) -> IndexPublisher | None:
    """``[index] publish``: pushes with the lazy side's registry client and its credentials."""
    if not config.index.publish:
        return None
    if lazy is None:
        log.warning("index publish is on but lazy pulling is not: nothing will be published")
        return None

    def open_content(namespace: str) -> ContainerdClient:
        return ContainerdClient(config.cri.containerd_address, namespace)

    # Layer blobs are copied here while their zTOC is built: on the daemon's disk rather than
    # in /tmp, which may be memory. What a killed daemon left behind is removed now.
    work = layout.index_publish
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700, parents=True)
    log.info("index publish on", extra={"min_layer_size": config.index.min_layer_size,
                                        "span_size": config.index.span_size})
    return IndexPublisher(lazy.client, open_content, config.index, work)


def _summary(config: Config, lazy: LazySide | None) -> DaemonSummary:
    if lazy is not None:
        mode = "lazy"
    elif config.lazy.enabled:
        mode = "ordinary: FUSE unavailable"
    else:
        mode = "ordinary: lazy pulling disabled (lazy.enabled = false)"
    return DaemonSummary(mode, {
        "root": str(config.root),
        "hosts_dir": str(config.hosts_dir),
        "background_fetch": str(config.lazy.background_fetch).lower(),
        "cache_capacity": str(config.lazy.cache_capacity),
        "keep_mounted_on_stop": str(config.lazy.keep_mounted_on_stop).lower(),
        "kata_guest_pull": str(config.kata.guest_pull).lower(),
        "cri_image_service": str(config.cri.image_service_address or ""),
        "metrics": config.metrics.address or "",
        "index_publish": str(config.index.publish).lower(),
        "profile_prefetch": str(config.profile.prefetch).lower(),
        "profile_publish": str(config.profile.publish).lower(),
    })


@dataclass(slots=True)
class _Exported:
    """What the metrics read: the lazy side, once it is up (None: not yet, or not lazy)."""

    lazy: LazySide | None = None
    publisher: IndexPublisher | None = None


def _image_lookups(layers: LazyLayers) -> dict[tuple[str, str], int]:
    """Registry lookups per image, by what was looked up and the result."""
    counts = {}
    for lookup, results in (("soci_index", layers.soci.lookup_results),
                            ("startup_profile", layers.profiles.lookup_results)):
        counts.update({(lookup, result): count for result, count in results.items()})
    return counts


def _start_metrics(config: Config, exported: _Exported, grpc_stats: GrpcStats,
                   token: trio.lowlevel.TrioToken) -> MetricsServer:
    """Serve /metrics; each scrape copies the counters on the trio thread (one hop)."""

    def take() -> DaemonSnapshot:
        lazy = exported.lazy
        published = {} if exported.publisher is None else dict(exported.publisher.counts)
        if lazy is None:
            return DaemonSnapshot(VERSION, lazy=False, grpc=grpc_stats.snapshot())
        return DaemonSnapshot(
            VERSION, lazy=True, fs=lazy.fs.snapshot(), registry=lazy.client.stats.copy(),
            fallbacks=dict(lazy.layers.fallbacks), grpc=grpc_stats.snapshot(),
            index_publish=published, image_lookups=_image_lookups(lazy.layers),
        )

    registry = metrics_registry(from_trio(take, token), per_layer=config.metrics.per_layer)
    assert config.metrics.address is not None
    try:
        server = start_metrics_server(config.metrics.address, registry)
    except MetricsServerError as exc:
        raise StartupError(str(exc)) from None
    log.info("metrics served", extra={"address": config.metrics.address,
                                      "per_layer": config.metrics.per_layer})
    return server


async def _next_stop_signal(signals: AsyncIterator[int]) -> int:
    async for signum in signals:
        return int(signum)
    return 0


async def _serve(config: Config, snapshotter: Snapshotter) -> int:
    async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
        # Lookup order: pushed by `lazysnap pull`, captured from CRI pulls, kubelet credential
        # providers, docker config.
        docker_config = DockerConfigCredentials()
        # Refuse to start next to a running daemon before touching its FUSE connection.
        await trio.to_thread.run_sync(_check_socket, config.address)
        exported = _Exported()
        grpc_stats = None
        if config.metrics.address is not None:
            grpc_stats = GrpcStats()
            metrics = await trio.to_thread.run_sync(
                _start_metrics, config, exported, grpc_stats, trio.lowlevel.current_trio_token()
            )
            stack.push_async_callback(trio.to_thread.run_sync, metrics.close)

        def start_soon(task: Callable[[], Awaitable[None]]) -> None:
            nursery.start_soon(task)  # called on the trio thread, by lookups

        kubelet = await trio.to_thread.run_sync(
            _kubelet_credentials, config, docker_config, start_soon
        )
        node: CredentialProvider = kubelet or docker_config
        cri_store = await trio.to_thread.run_sync(_cri_credentials, config, node)
        credentials = PushedCredentials(cri_store or node)
        lazy = await _start_lazy(config, snapshotter, nursery, credentials)
        exported.lazy = lazy
        publisher = await trio.to_thread.run_sync(
            _index_publisher, config, lazy, snapshotter.layout
        )
        if publisher is not None:
            await nursery.start(publisher.run)
            exported.publisher = publisher
        if lazy is not None and config.profile.publish:
            # Pushes with the lazy side's registry client and its credentials.
            profiles = ProfilePublisher(lazy.client, lazy.fs.first_reads, config.profile)
            await nursery.start(profiles.run)
            lazy.layers.on_attached = profiles.attached
            log.info("startup profile publish on",
                     extra={"record_seconds": config.profile.record_seconds})
        server = await trio.to_thread.run_sync(
            _start_server, snapshotter, config.address, lazy, grpc_stats,
            _summary(config, lazy), publisher,
        )
        proxy = None
        if cri_store is not None:
            try:
                proxy = await trio.to_thread.run_sync(
                    _start_cri_proxy, config, cri_store, lazy, publisher
                )
            except StartupError:
                await trio.to_thread.run_sync(lambda: server.stop(None).wait())
                raise
        log.info(
            "serving", extra={"version": VERSION, "root": str(config.root),
                              "address": str(config.address), "pid": os.getpid(),
                              "lazy": lazy is not None,
                              "kata_guest_pull": config.kata.guest_pull,
                              "metrics": config.metrics.address,
                              "cri_image_service": None if proxy is None else str(proxy.address)},
        )
        # The signals are received before READY: a SIGTERM right after it stops the daemon
        # cleanly instead of killing it.
        signals = stack.enter_context(trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
        notify(f"READY=1\nSTATUS=serving on {config.address}\nMAINPID={os.getpid()}")
        try:
            signum = await _next_stop_signal(signals)
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
        finally:
            notify("STOPPING=1")
            if proxy is not None:
                await trio.to_thread.run_sync(_stop_cri_proxy, proxy)
            # In-flight RPCs finish. They may still hop into trio, so wait off the trio thread.
            await trio.to_thread.run_sync(
                lambda: server.stop(SHUTDOWN_GRACE_SECONDS).wait()
            )
            snapshotter.enable_remote(None)
            with contextlib.suppress(FileNotFoundError):
                config.address.unlink()
            kept = False
            if lazy is not None:
                fs = lazy.fs
                await lazy.client.aclose()
                layout = snapshotter.layout
                if config.lazy.keep_mounted_on_stop:
                    kept = await trio.to_thread.run_sync(
                        _keeper_holds, layout.fuse, fuse_keeper.keeper_socket(layout.root)
                    )
                if kept:
                    fs.leave_mounted()
                else:
                    fs.unmount()
            nursery.cancel_scope.cancel()
    if lazy is not None and not kept:
        layout = snapshotter.layout
        await trio.to_thread.run_sync(
            _release_keeper, layout.fuse, fuse_keeper.keeper_socket(layout.root)
        )
    if lazy is not None and kept:
        # Only now has the FUSE server stopped reading: the passthrough state is final.
        state = lazy.fs.passthrough_handover()
        if state is not None:
            keeper = fuse_keeper.keeper_socket(snapshotter.layout.root)
            noted = await trio.to_thread.run_sync(
                fuse_keeper.leave_note, keeper, {"passthrough": state}
            )
            log.info("fuse passthrough state left to the keeper noted=%s", noted,
                     extra={"event": "fuse_passthrough_noted", "noted": noted})
    return signum


def _passthrough_note(handover: fuse_keeper.Handover | None) -> object:
    """The passthrough state the previous daemon left with the keeper, if any."""
    if handover is None or not isinstance(handover.note, dict):
        return None
    return handover.note.get("passthrough")


def _keeper_holds(mountpoint: Path, keeper: Path) -> bool:
    """Whether a keeper holds the live connection of the mount at ``mountpoint`` (then the
    daemon may stop without unmounting: the next one takes the connection over)."""
    handover = fuse_keeper.take_over(keeper, mountpoint)
    if handover is None:
        log.warning("no fuse keeper holds the connection; unmounting on stop",
                    extra={"mountpoint": str(mountpoint)})
        return False
    os.close(handover.fd)  # the keeper keeps its own copy
    log.info("fuse connection left to the keeper for the next daemon",
             extra={"mountpoint": str(mountpoint), "keeper_pid": handover.keeper_pid})
    return True


def _release_keeper(mountpoint: Path, keeper: Path) -> None:
    """After a clean stop's unmount, let the keeper go: containers still running on lazy
    layers hold the filesystem through their overlay mounts (overlayfs keeps its own private
    reference), so the connection would otherwise live on, unserved, and their reads would
    hang instead of failing with ENOTCONN as they did before keepers. A mount still in place
    (busy) keeps its keeper: the next daemon takes it over."""
    if fuse_keeper.mount_device(mountpoint) is not None:
        log.warning("fuse mount still in place after stop; kept for the next daemon",
                    extra={"mountpoint": str(mountpoint)})
        return
    fuse_keeper.retire(keeper)


def _startup_error(group: BaseExceptionGroup[BaseException]) -> StartupError | None:
    """trio wraps errors raised in a nursery in groups; an operator wants the message."""
    found = group.subgroup(StartupError)
    while found is not None:
        first = found.exceptions[0]
        if isinstance(first, StartupError):
            return first
        found = first.subgroup(StartupError) if isinstance(first, BaseExceptionGroup) else None
    return None


def serve(config: Config) -> int:
    snapshotter = _open_snapshotter(config.root, _guest_pull(config))
    try:
        trio.run(_serve, config, snapshotter)
    except BaseExceptionGroup as group:
        startup = _startup_error(group)
        if startup is not None:
            raise startup from None
        raise
    finally:
        snapshotter.close()
    log.info("stopped")
    return 0
