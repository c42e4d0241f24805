"""``LazyFilesystem``: the one mount, its attached layers, the chunk cache and fetcher together.

Use it inside trio::

    fs = LazyFilesystem(mountpoint, cache_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run)          # mounted once this returns
        path = await fs.attach("layer-1", blob, index, background_fetch=True)
        ...
        fs.unmount()                         # or cancel the nursery; run() unmounts cleanly

``run`` also returns when the mount is removed from outside, as by ``fusermount3 -u``.

A restarted daemon that got the previous process's ``/dev/fuse`` fd from
``snapshotter.daemon.keeper`` passes it as ``adopt_fd``. ``run`` then serves that connection
instead of mounting, but reads no request before ``resume()``. The layers are attached at their
old slots first, because a request for a slot not yet attached would fail with ESTALE.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from fusefs import session
from fusefs.accesslog import AccessLog
from fusefs.background import run_layer_background
from fusefs.blob import BlobReader
from fusefs.cache import CacheOwner, CacheUsage, ChunkCache
from fusefs.exec_prefetch import ExecPrefetch
from fusefs.fetcher import ChunkFetcher, Decoder, FetchConfig
from fusefs.first_reads import FirstRead, FirstReads
from fusefs.handlers import LazyHandlers
from fusefs.index import LayerIndex
from fusefs.inodes import SINGLE_LAYER_SLOT, InodeMap
from fusefs.layer import Layer
from fusefs.pending import PendingLayer
from fusefs.profile_prefetch import prefetch_profile
from fusefs.slot_mark import SlotMark
from fusefs.stats import FsSnapshot, LayerMeters, LayerSnapshot
from fusefs.table import LayerTable, check_layer_id

log = logging.getLogger(__name__)

DEFAULT_CACHE_CAPACITY = 10 << 30
# Chunks (un)registered per trio step by release_detached_layers and collect_garbage: the
# walk yields to readers in between.
_ACCOUNTING_STEP = 5000


@dataclass(frozen=True, slots=True)
class LayerUsage:
    layer_id: str
    slot: int
    digest: str
    blob_size: int
    entry_count: int
    cached_bytes: int  # uncompressed bytes of this layer's chunks now in the cache
    fetched_bytes: int  # compressed bytes read from the blob so far
    requests: int
    errors: int
    verify_failures: int
    background_done: bool
    blob_verified: bool | None
    last_error: str | None = None
    # Compressed bytes fetched, by kind (``fusefs.stats.FETCH_KINDS``).
    fetched_by_kind: dict[str, int] | None = None


class LazyFilesystem:
    def __init__(
        self,
        mountpoint: Path,
        cache_dir: Path,
        *,
        cache_capacity: int = DEFAULT_CACHE_CAPACITY,
        fsname: str = "lazysnap",
        config: FetchConfig | None = None,
        access_log: Path | None = None,
        single_layer: bool = False,
        allow_other: bool = True,
        decoder: Decoder | None = None,
        adopt_fd: int | None = None,
        slot_mark: Path | None = None,
        libfuse: bool = False,
        passthrough: bool = False,
        passthrough_handover: object = None,
        record_first_reads: tuple[float, int] | None = None,
    ) -> None:
        """``single_layer``: the one attached layer is the mount root instead of a directory
        ``<mountpoint>/<layer-id>``, as ``lazysnap mount --blob`` wants. ``adopt_fd``: an open
        ``/dev/fuse`` connection already mounted at ``mountpoint`` to serve; this object closes it.
        ``slot_mark``: a file recording the layer slots handed out, so that a daemon serving a
        connection taken over never reuses the slot of a layer removed before it started.
        ``libfuse``: mount and serve with pyfuse3 even as root (see ``session.serve``).
        ``passthrough``: use FUSE passthrough for files whole in the cache when the kernel
        offers it (``fusefs.fuse.passthrough``); False: never ask for it.
        ``passthrough_handover``: with ``adopt_fd``, the passthrough state the previous daemon
        left (``passthrough_handover()``), adopted even with ``passthrough`` False so that the
        files it opened in passthrough open again (then no new copies are made).
        ``record_first_reads``: (seconds, files) to record per layer from its first read, for
        startup profiles (``first_reads``)."""
        self.mountpoint = mountpoint
        self._cache_dir = cache_dir
        self._cache_capacity = cache_capacity
        self._fsname = fsname
        self._config = config or FetchConfig()
        self._access_log_path = access_log
        self._allow_other = allow_other
        self._decoder = decoder
        self._inodes = InodeMap(single_layer=single_layer)
        mark = None if slot_mark is None else SlotMark(slot_mark,
                                                      fresh_connection=adopt_fd is None)
        self._table = LayerTable(mark)
        self._background: dict[str, trio.CancelScope] = {}
        self._profile_scopes: dict[str, list[trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        self._fetcher: ChunkFetcher | None = None
        self._cache: ChunkCache | None = None
        self._leave_mounted = False
        self._run_scope: trio.CancelScope | None = None
        self._handlers: LazyHandlers | None = None
        self._adopt_fd = adopt_fd
        self._libfuse = libfuse
        self._passthrough = passthrough
        self._passthrough_handover = passthrough_handover
        self._took_over = adopt_fd is not None
        self._resume = trio.Event()
        self._retired = LayerMeters()  # meters of layers detached since start
        self.index_build_failures = 0  # layers answered whose index then failed to build
        self._first_reads = None if record_first_reads is None else FirstReads(
            *record_first_reads)

    # -- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the cache, mount, and serve until unmounted from outside, by ``unmount()`` or
        by cancellation. Signals ``task_status`` once the mount is live. With ``adopt_fd`` that
        is once layers can be attached, and requests are answered after ``resume()``."""
        if self._run_scope is not None:
            raise RuntimeError("LazyFilesystem.run() is already running")
        self._cache = await ChunkCache.open(self._cache_dir, capacity_bytes=self._cache_capacity)
        with trio.CancelScope() as scope:
            self._run_scope = scope
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._fetcher = ChunkFetcher(self._cache, nursery, self._config, self._decoder)
                    access_log = None
                    if self._access_log_path is not None:
                        access_log = AccessLog(self._access_log_path)
                        nursery.start_soon(access_log.run)
                    exec_prefetch = None
                    if self._config.exec_prefetch:
                        exec_prefetch = ExecPrefetch(self._fetcher, nursery, self._table.layers)
                    self._handlers = LazyHandlers(
                        self._table,
                        self._fetcher,
                        self._inodes,
                        mount_time_ns=time.time_ns(),
                        access_log=access_log,
                        exec_prefetch=exec_prefetch,
                        first_reads=self._first_reads,
                    )
                    await nursery.start(self._serve, self._handlers)
                    task_status.started()
            finally:
                self._nursery = None
                self._fetcher = None
                self._background.clear()
                self._run_scope = None

    async def _serve(
        self,
        handlers: LazyHandlers,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._adopt_fd is None:
            await session.serve(
                handlers,
                self.mountpoint,
                fsname=self._fsname,
                allow_other=self._allow_other,
                unmount_when_cancelled=self._unmount_when_stopped,
                libfuse=self._libfuse,
                passthrough_dir=self._cache_dir if self._passthrough else None,
                task_status=task_status,
            )
        else:
            fd, self._adopt_fd = self._adopt_fd, None
            try:
                task_status.started()
                # Hold the kernel's queue until the caller re-attached its layers.
                await self._resume.wait()
            except BaseException:
                os.close(fd)  # the mount stays: whoever else holds the connection keeps it
                raise
            handover, self._passthrough_handover = self._passthrough_handover, None
            await session.serve_adopted(
                handlers, fd, self.mountpoint, unmount_when_cancelled=self._unmount_when_stopped,
                passthrough_state=handover,
                passthrough_dir=self._cache_dir if self._passthrough else None,
            )
        # Unmounted from outside: stop background work so run() returns.
        if self._run_scope is not None:
            self._run_scope.cancel()

    def unmount(self) -> None:
        """Stop serving; ``run`` unmounts and returns."""
        self._leave_mounted = False
        if self._run_scope is not None:
            self._run_scope.cancel()

    def leave_mounted(self) -> None:
        """Stop serving without unmounting; ``run`` returns. Only useful while another process
        holds the connection, such as the fuse keeper: the mount then stays, requests queue in the
        kernel, and the next process that takes the connection over answers them."""
        self._leave_mounted = True
        if self._run_scope is not None:
            self._run_scope.cancel()

    def passthrough_handover(self) -> dict[str, object] | None:
        """After ``run`` returned from ``leave_mounted``: the passthrough state for the next
        daemon (its ``passthrough_handover``), None when the connection had no passthrough."""
        return session.left_passthrough_state()

    def _unmount_when_stopped(self) -> bool:
        return not self._leave_mounted

    def resume(self) -> None:
        """With ``adopt_fd``, start answering the kernel; otherwise do nothing."""
        self._resume.set()

    def dup_device_fd(self) -> int:
        """A duplicate of the live ``/dev/fuse`` connection's fd, for a keeper process to hold
        and for the caller to close. Raises RuntimeError when not serving."""
        return session.dup_device_fd()

    # -- layers ------------------------------------------------------------------------------

    async def attach(
        self,
        layer_id: str,
        blob: BlobReader,
        index: LayerIndex,
        *,
        background_fetch: bool = True,
        slot: int | None = None,
        meters: LayerMeters | None = None,
    ) -> Path:
        """Make ``index`` readable at ``<mountpoint>/<layer_id>`` and start prefetch, and
        background fetch if asked. ``slot`` pins the inode range: the daemon stores it so that a
        restart reuses it. By default a slot never handed out on this connection is taken.
        ``meters``: what was measured of the layer before its index was built."""
        check_layer_id(layer_id)
        if self._nursery is None or self._fetcher is None:
            raise RuntimeError("attach() needs a running filesystem (start run() first)")
        if self._inodes.single_layer:
            if len(self._table):
                raise ValueError("a single-layer mount holds one layer")
            slot = SINGLE_LAYER_SLOT
        if slot is None:
            slot = self._table.free_slot()
        layer = Layer(layer_id, slot, blob, index)
        if meters is not None:
            layer.stats.meters = meters
        self._table.add(layer)
        scope = trio.CancelScope()
        self._background[layer_id] = scope
        self._nursery.start_soon(self._run_background, layer, scope, background_fetch)
        # The root lists one more layer, or, on a single-layer mount, is now the layer's root.
        session.forget_root_listing()
        log.info(
            "layer attached layer=%s slot=%d digest=%s entries=%d background=%s",
            layer_id,
            slot,
            blob.digest,
            index.entry_count,
            background_fetch,
        )
        return self.layer_path(layer_id)

    def attach_building(
        self,
        layer_id: str,
        blob: BlobReader,
        build: Callable[[], Awaitable[LayerIndex]],
        *,
        background_fetch: bool = True,
        slot: int | None = None,
    ) -> int:
        """Take a slot for ``layer_id`` now and attach it once ``build`` returns its index; the
        slot. Until then a lookup of the layer waits (``fusefs.pending``). A build that raises
        leaves the layer failed: every lookup of it answers EIO until it is detached.
        ``meters`` and ``slot_of`` answer for it meanwhile."""
        check_layer_id(layer_id)
        if self._nursery is None or self._fetcher is None:
            raise RuntimeError("attach_building() needs a running filesystem (start run() first)")
        if self._inodes.single_layer:
            raise ValueError("a single-layer mount attaches its layer with attach()")
        if slot is None:
            slot = self._table.free_slot()
        pending = PendingLayer(layer_id, slot, blob.digest)
        self._table.add_pending(pending)
        self._nursery.start_soon(self._build, pending, blob, build, background_fetch)
        return slot

    def is_building(self, layer_id: str) -> bool:
        """Whether ``layer_id`` waits for its index, or failed to get one."""
        return self._table.pending(os.fsencode(layer_id)) is not None

    async def _build(
        self,
        pending: PendingLayer,
        blob: BlobReader,
        build: Callable[[], Awaitable[LayerIndex]],
        background_fetch: bool,
    ) -> None:
        started = trio.current_time()
        index: LayerIndex | None = None
        try:
            with pending.scope:  # cancelled when the layer is detached meanwhile
                index = await build()
        except Exception as exc:  # malformed entries behind a valid digest, or a bug
            failure = f"{type(exc).__name__}: {exc}"[:500]
            if self._table.pending(os.fsencode(pending.layer_id)) is pending:
                pending.failure = failure
                self.index_build_failures += 1
                log.error("layer index build failed layer=%s slot=%d digest=%s reason=%s; "
                          "every operation on the layer answers EIO", pending.layer_id,
                          pending.slot, pending.digest, failure,
                          extra={"event": "layer_index_build_failed"})
        else:
            if index is not None and self._table.pending(
                os.fsencode(pending.layer_id)
            ) is pending:
                await self.attach(pending.layer_id, blob, index,
                                  background_fetch=background_fetch, slot=pending.slot,
                                  meters=pending.meters)
                log.debug("layer index built after its attach layer=%s seconds=%.3f",
                          pending.layer_id, trio.current_time() - started)
        finally:
            pending.ready.set()

    async def wait_built(self, layer_id: str) -> str | None:
        """Wait until ``layer_id``'s index build (``attach_building``) ended; the reason it
        failed, or None (also for a layer that was not being built)."""
        pending = self._table.pending(os.fsencode(layer_id))
        if pending is None:
            return None
        await pending.ready.wait()
        return pending.failure

    def pending_layers(self) -> list[PendingLayer]:
        """Layers whose index is being built, or failed to build, in slot order."""
        return self._table.pending_layers()

    async def _run_background(
        self, layer: Layer, scope: trio.CancelScope, background: bool
    ) -> None:
        assert self._fetcher is not None
        with scope:
            await run_layer_background(self._fetcher, layer, background=background)

    def prefetch_files(self, layer_id: str, files: Sequence[tuple[str, int]]) -> bool:
        """Fetch ``files`` ((absolute path, bytes to fetch from its start), the earliest needed
        first) of an attached layer in large parallel ranges, alongside its readers; a startup
        profile's list. Returns at once; False if the layer is not attached. Only the order of
        fetches changes: paths are looked up in the layer's index and every chunk is verified."""
        layer = self._table.by_id(layer_id)
        if layer is None or self._nursery is None or self._fetcher is None or not files:
            return False
        self._nursery.start_soon(self._prefetch_files, layer, list(files))
        return True

    async def _prefetch_files(self, layer: Layer, files: list[tuple[str, int]]) -> None:
        assert self._fetcher is not None
        scope = self._background.get(layer.layer_id)
        with trio.CancelScope() as own:
            if scope is None:
                return
            # Detach cancels the layer's background scope; this task watches it.
            self._profile_scopes.setdefault(layer.layer_id, []).append(own)
            try:
                await prefetch_profile(self._fetcher, layer, files)
            except Exception as exc:
                log.warning("profile prefetch failed layer=%s error=%r", layer.layer_id, exc)
            finally:
                scopes = self._profile_scopes.get(layer.layer_id, [])
                if own in scopes:
                    scopes.remove(own)

    def first_reads(self, layer_id: str) -> list[FirstRead]:
        """The files of an attached layer read first (recorded only with
        ``record_first_reads``), in first-read order; times are ``trio.current_time()``."""
        layer = self._table.by_id(layer_id)
        if layer is None or self._first_reads is None:
            return []
        return self._first_reads.of(layer)

    async def detach(self, layer_id: str) -> None:
        """Remove a layer: its directory disappears and its inodes become stale. A layer whose
        index is still being built stops building; lookups waiting for it answer ENOENT."""
        pending = self._table.remove_pending(layer_id)
        if pending is not None:
            pending.scope.cancel()
            pending.ready.set()
            log.info("layer detached before its index was built layer=%s slot=%d digest=%s",
                     layer_id, pending.slot, pending.digest)
            return
        layer = self._table.remove(layer_id)
        for own in self._profile_scopes.pop(layer_id, []):
            own.cancel()
        if self._first_reads is not None:
            self._first_reads.forget(layer_id)
        self._retired.add(_meters_of(layer))
        scope = self._background.pop(layer_id, None)
        if scope is not None:
            scope.cancel()
        if not self._inodes.single_layer:
            session.forget_root_entry(os.fsencode(layer_id))
        session.forget_root_listing()
        log.info("layer detached layer=%s slot=%d digest=%s", layer_id, layer.slot, layer.digest)

    def layer_path(self, layer_id: str) -> Path:
        if self._inodes.single_layer:
            return self.mountpoint
        return self.mountpoint / layer_id

    def slot_of(self, layer_id: str) -> int:
        """The slot, that is the inode range, of an attached layer; KeyError if not attached."""
        layer = self._table.by_id(layer_id)
        if layer is None:
            pending = self._table.pending(os.fsencode(layer_id))
            if pending is None:
                raise KeyError(layer_id)
            return pending.slot
        return layer.slot

    def layer_ids(self) -> list[str]:
        return [layer.layer_id for layer in self._table.layers()]

    # -- reporting ---------------------------------------------------------------------------

    async def writes_done(self) -> None:
        """Wait until every chunk fetched so far is in the disk cache: readers get chunks before
        they are written, so ``usage().cached_bytes`` may trail a read by a few milliseconds."""
        if self._fetcher is not None:
            await self._fetcher.writes_done()

    async def track_usage(self, layer_id: str) -> None:
        """Register the layer's chunks with the cache for ``usage``, in steps that leave the
        trio thread to readers between them; then ``usage`` is O(1). The first Usage of twenty
        layers at once held the trio thread for a whole walk each (3.2 % of the daemon's samples
        in benchmarks/scale.py's CRI arm). No-op for a layer not attached or registered."""
        cache = self._cache
        layer = self._table.by_id(layer_id)
        if cache is None or layer is None:
            return
        while self._table.by_id(layer_id) is layer and not layer.track_cached_bytes(
            cache, _ACCOUNTING_STEP
        ):
            await trio.lowlevel.checkpoint()

    def usage(self, layer_id: str) -> LayerUsage:
        """Counters of one layer. ``cached_bytes`` is kept by the cache as chunks come and go:
        the first call for a layer registers its chunks there in one O(chunks) walk, unless
        ``track_usage`` or ``collect_garbage`` did it already. Later calls are O(1), as
        containerd polls Usage."""
        layer = self._table.by_id(layer_id)
        if layer is None:
            raise KeyError(layer_id)
        cached = 0
        if self._cache is not None:
            layer.track_cached_bytes(self._cache)
            cached = layer.cached_bytes
        stats = layer.stats
        return LayerUsage(
            layer_id=layer_id,
            slot=layer.slot,
            digest=layer.digest,
            blob_size=layer.blob.size,
            entry_count=layer.index.entry_count,
            cached_bytes=cached,
            fetched_bytes=stats.fetched_bytes,
            requests=stats.requests,
            errors=stats.errors,
            verify_failures=stats.verify_failures,
            background_done=stats.background_done,
            blob_verified=stats.blob_verified,
            last_error=stats.last_error,
            fetched_by_kind=dict(stats.meters.fetched_bytes),
        )

    def meters(self, layer_id: str) -> LayerMeters:
        """The live meters of an attached layer, or of one whose index is being built, for the
        attach timings its caller measures; KeyError if neither."""
        layer = self._table.by_id(layer_id)
        if layer is None:
            pending = self._table.pending(os.fsencode(layer_id))
            if pending is None:
                raise KeyError(layer_id)
            return pending.meters
        return layer.stats.meters

    def snapshot(self) -> FsSnapshot:
        """Every counter at this moment, copied; call it on the trio thread. Cheap: no walk
        over chunks, so a metrics scrape never holds readers up."""
        layers = [
            LayerSnapshot(
                layer_id=layer.layer_id,
                digest=layer.digest,
                size=layer.blob.size,
                prefetch_size=layer.index.prefetch_end or 0,
                meters=_meters_of(layer),
            )
            for layer in self._table.layers()
        ]
        return FsSnapshot(
            layers=layers,
            retired=self._retired.copy(),
            takeovers=int(self._took_over),
            lost_requests_answered=session.lost_requests_answered(),
            cache=self.cache_usage(),
            index_build_failures=self.index_build_failures,
        )

    def cache_usage(self) -> CacheUsage | None:
        return None if self._cache is None else self._cache.usage()

    # -- cache garbage collection --------------------------------------------------------------

    async def release_detached_layers(self) -> None:
        """Withdraw the cache registrations of layers detached since ``usage`` made them, in steps
        that leave the trio thread to readers; a detached layer's chunks are then garbage unless
        another layer holds them, and its index is no longer kept alive by the cache."""
        cache = self._cache
        if cache is None:
            return
        attached = set(self._table.layers())
        for owner in cache.owners():
            if isinstance(owner, Layer) and owner not in attached:
                while not owner.untrack_cached_bytes(_ACCOUNTING_STEP):
                    await trio.lowlevel.checkpoint()

    async def collect_garbage(
        self, *, keep_blob_digests: Iterable[str] = (), keep_content_addressed: bool = False
    ) -> tuple[int, int]:
        """Remove the cached chunks no attached layer references; return (chunks, bytes).

        The caller may know of layers that are not attached, whose chunk lists are unknown. For
        them, pass ``keep_content_addressed``, since any content-addressed chunk could be theirs,
        and their blob digests in ``keep_blob_digests`` to keep their digest-less chunks. Chunks
        being read are kept. Nothing is removed unless the filesystem is running.
        """
        cache = self._cache
        if cache is None or self._nursery is None:
            return 0, 0
        await self.release_detached_layers()
        # Register the attached layers' chunks in steps first, so that the decisions below only
        # need to finish what a layer attached in the meantime adds.
        for layer in self._table.layers():
            while self._table.by_id(layer.layer_id) is layer and not layer.track_cached_bytes(
                cache, _ACCOUNTING_STEP
            ):
                await trio.lowlevel.checkpoint()

        def live_owners() -> set[CacheOwner]:
            layers = self._table.layers()
            for attached in layers:
                attached.track_cached_bytes(cache)  # no-op unless attached a moment ago
            return set(layers)

        chunks, size = await cache.collect_garbage(
            live_owners,
            keep_content_addressed=keep_content_addressed,
            keep_blob_digests=keep_blob_digests,
        )
        log.info(
            "cache garbage collected chunks=%d bytes=%d kept_content_addressed=%s",
            chunks,
            size,
            keep_content_addressed,
        )
        return chunks, size


def _meters_of(layer: Layer) -> LayerMeters:
    """A copy of the layer's meters, with the chunk verification failures the fetcher counts
    on the layer's stats."""
    meters = layer.stats.meters.copy()
    meters.chunk_verify_failures = layer.stats.verify_failures
    return meters
