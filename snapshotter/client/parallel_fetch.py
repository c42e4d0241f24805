"""Layer blobs downloaded in ranges over several connections at once, into spools.

One pool of workers serves every layer of a pull. Ranges are queued in chain order, so the
bottom layer, which is unpacked first, gets the link first, and the next layers follow while it
is unpacked. A registry that answers a range with the whole blob gets one whole, verified
download instead. The worker pool runs in the trio loop that owns the registry client; the
unpacker, in a worker thread, asks for layers with ``start`` and reads their ``Spool``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from registry import Descriptor, RangeNotSupportedError, Reference, RegistryError
from snapshotter.client.fetch_settings import FetchSettings
from snapshotter.client.spool import Spool, SpoolError, plan_ranges

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

class RangedBlob(Protocol):
    async def read_at(self, offset: int, length: int) -> bytes: ...


class BlobRegistry(Protocol):
    """What the fetcher needs of ``registry.RegistryClient``."""

    async def open_blob(
        self, ref: Reference, digest: str, size: int | None = None
    ) -> RangedBlob: ...

    async def download_blob(self, ref: Reference, digest: str, dest: Path) -> int: ...


class TruncatedRangeError(SpoolError):
    """The registry answered a range with fewer bytes than asked."""


@dataclass(slots=True)
class _Job:
    layer: Descriptor
    spool: Spool
    blob: RangedBlob | None = None
    whole: bool = False  # the registry ignores Range: one whole download replaces the ranges


@dataclass(frozen=True, slots=True)
class _Range:
    job: _Job
    offset: int
    length: int


class ParallelFetcher:
    """Download layers into spools under ``scratch``, in the trio loop of ``nursery``."""

    def __init__(
        self,
        registry: BlobRegistry,
        ref: Reference,
        scratch: Path,
        nursery: trio.Nursery,
        token: trio.lowlevel.TrioToken,
        settings: FetchSettings | None = None,
    ) -> None:
        import trio  # noqa: PLC0415 - the client imports trio only where it is used

        self._registry = registry
        self._ref = ref
        self._scratch = scratch
        self._nursery = nursery
        self._token = token
        self.settings = settings or FetchSettings()
        self._jobs: dict[str, _Job] = {}
        self._send, self._receive = trio.open_memory_channel[_Range](math.inf)
        self._workers = 0

    # -- the unpacker's side (a worker thread) ----------------------------------------------

    def start(self, layers: Sequence[Descriptor]) -> None:
        """Begin downloading ``layers``, in this order, unless they are already on their way."""
        import trio  # noqa: PLC0415

        new = [layer for layer in layers if layer.digest not in self._jobs]
        for layer in new:
            path = self._scratch / layer.digest.replace(":", "-")
            self._jobs[layer.digest] = _Job(layer, Spool(path, layer.size))
        if new:
            jobs = [self._jobs[layer.digest] for layer in new]
            trio.from_thread.run_sync(self._enqueue, jobs, trio_token=self._token)

    def spool(self, layer: Descriptor) -> Spool:
        self.start([layer])
        return self._jobs[layer.digest].spool

    def forget(self, layer: Descriptor) -> None:
        """The layer is applied or abandoned: stop its download and drop its file."""
        job = self._jobs.get(layer.digest)
        if job is None:
            return
        job.spool.fail(SpoolError("download no longer needed"))
        job.spool.close()
        job.spool.path.unlink(missing_ok=True)

    def close(self) -> None:
        for digest in list(self._jobs):
            self.forget(self._jobs[digest].layer)

    # -- the trio side -----------------------------------------------------------------------

    def _enqueue(self, jobs: Sequence[_Job]) -> None:
        while self._workers < self.settings.connections:
            self._workers += 1
            self._nursery.start_soon(self._worker)
        for job in jobs:
            for offset, length in plan_ranges(job.layer.size, self.settings.range_size):
                self._send.send_nowait(_Range(job, offset, length))

    async def _worker(self) -> None:
        async for item in self._receive:
            job = item.job
            if job.whole or job.spool.settled:
                continue
            try:
                await self._fetch_range(item)
            except RangeNotSupportedError:
                await self._download_whole(job)
            except (RegistryError, SpoolError, OSError) as exc:
                log.info("pull range-failed digest=%s offset=%d error=%s",
                            job.layer.digest, item.offset, type(exc).__name__)
                job.spool.fail(exc)

    async def _fetch_range(self, item: _Range) -> None:
        job = item.job
        if job.blob is None:
            job.blob = await self._registry.open_blob(self._ref, job.layer.digest, job.layer.size)
        data = await job.blob.read_at(item.offset, item.length)
        if len(data) != item.length:
            raise TruncatedRangeError(
                f"blob {job.layer.digest}: range at {item.offset} returned {len(data)} of "
                f"{item.length} bytes"
            )
        job.spool.write_at(item.offset, data)

    async def _download_whole(self, job: _Job) -> None:
        if job.whole:
            return
        job.whole = True
        log.info("pull range-unsupported digest=%s fallback=download", job.layer.digest)
        dest = job.spool.path.with_name(job.spool.path.name + ".whole")
        try:
            await self._registry.download_blob(self._ref, job.layer.digest, dest)
        except (RegistryError, OSError) as exc:
            job.spool.fail(exc)
            return
        job.spool.replace_whole(dest)
