"""Layer TOCs read before their Prepare arrives, so the Prepare needs no registry round trip.

A Prepare that mounts a layer lazily waits for the blob's size, its footer and TOC ranges and the
TOC's parsing. Two things tell the daemon early which layers come next:

* ``lazysnap pull`` announces every layer it is about to unpack through ``Daemon/PrepareAhead``,
  with the labels its Prepares will carry and the layer sizes from the manifest;
* a Prepare with ``cri.image-layers`` names the image's other layers, which containerd unpacks
  one after another.

For each, a task opens the blob, reads and checks its TOC, then indexes it, and keeps the result
for a while. The Prepare waits for the check only, not for the index. It always takes the
recorded ranges, which need no network. It takes the checked TOC and the index (built or being
built) too when they were checked with the same expected digests the Prepare has. Otherwise the
TOC is checked again from the ranges with the Prepare's digests and indexed anew, so nothing is
trusted that the Prepare's labels would not vouch for. Everything here runs on the trio thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import trio

from fusefs import BlobReader, LayerIndex, VerifiedToc, build_index_off_loop
from registry import RegistryClient, parse_reference
from snapshotter.remote.open_layer import open_layer_toc

log = logging.getLogger(__name__)

AHEAD_TIMEOUT_SECONDS = 30.0
AHEAD_CAPACITY = 32  # layers read ahead and not yet taken; each holds about one tail read
AHEAD_LIFETIME_SECONDS = 120.0  # an announced layer whose Prepare never comes is dropped


@dataclass(frozen=True, slots=True)
class AheadLayer:
    image_ref: str
    digest: str
    size: int | None  # from the manifest; None: the registry is asked (HEAD)
    toc_digest: str | None  # the expected digests the index is built with
    annotations: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class TocRead:
    """What a Prepare takes: the open blob, the ranges its TOC reader read, and, when the TOC
    was checked with the Prepare's own expected digests, that TOC and ``built``, which waits
    for its index (raising the build's LayerFormatError if it failed)."""

    blob: BlobReader
    ranges: dict[int, bytes]
    toc: VerifiedToc | None
    built: Callable[[], Awaitable[LayerIndex]] | None


@dataclass(slots=True)
class _Entry:
    layer: AheadLayer
    created: float
    done: trio.Event = field(default_factory=trio.Event)  # the TOC checked, or failed
    built: trio.Event = field(default_factory=trio.Event)  # the index built, or failed
    blob: BlobReader | None = None
    ranges: dict[int, bytes] = field(default_factory=dict)
    toc: VerifiedToc | None = None
    index: LayerIndex | None = None
    build_error: Exception | None = None

    async def index_when_built(self) -> LayerIndex:
        await self.built.wait()
        if self.index is None:
            raise self.build_error or RuntimeError("layer index not built")
        return self.index


class TocReadAhead:
    def __init__(
        self,
        client: RegistryClient,
        *,
        capacity: int = AHEAD_CAPACITY,
        lifetime: float = AHEAD_LIFETIME_SECONDS,
    ) -> None:
        self._client = client
        self._capacity = capacity
        self._lifetime = lifetime
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def start(self, layer: AheadLayer) -> bool:
        """Begin reading ``layer``'s TOC unless it is already being read; True if started."""
        now = trio.current_time()
        while self._entries:  # the oldest first: drop those nobody took in time
            oldest = next(iter(self._entries.values()))
            if now - oldest.created < self._lifetime:
                break
            self._entries.popitem(last=False)
        if layer.digest in self._entries or len(self._entries) >= self._capacity:
            return False
        entry = _Entry(layer, now)
        self._entries[layer.digest] = entry
        # A system task: it outlives the RPC that started it and is cancelled at shutdown.
        trio.lowlevel.spawn_system_task(self._read, entry)
        return True

    def not_lazy(self, digest: str) -> None:
        """Remember for a while that ``digest`` has no TOC to read, as its labels said, so a
        neighbour read-ahead does not request its tail for nothing."""
        if digest in self._entries or len(self._entries) >= self._capacity:
            return
        entry = _Entry(AheadLayer("", digest, None, None, None), trio.current_time())
        entry.done.set()  # nothing to read: take() finds no blob and returns None
        entry.built.set()
        self._entries[digest] = entry

    async def take(
        self, digest: str, *, toc_digest: str | None, annotations: Mapping[str, str]
    ) -> TocRead | None:
        """The TOC read ahead for ``digest``, or None. Waits for its check if still in flight,
        never for its index."""
        entry = self._entries.pop(digest, None)
        if entry is None:
            return None
        await entry.done.wait()  # bounded: the read gives up after AHEAD_TIMEOUT_SECONDS
        if entry.blob is None:
            return None
        same_digests = entry.layer.toc_digest == toc_digest and dict(
            entry.layer.annotations or {}
        ) == dict(annotations)
        if not same_digests or entry.toc is None:
            return TocRead(entry.blob, entry.ranges, None, None)
        return TocRead(entry.blob, entry.ranges, entry.toc, entry.index_when_built)

    def pending(self) -> int:
        return len(self._entries)

    async def _read(self, entry: _Entry) -> None:
        layer = entry.layer
        try:
            with trio.fail_after(AHEAD_TIMEOUT_SECONDS):
                checked = await open_layer_toc(self._client, parse_reference(layer.image_ref),
                                               layer.digest, layer.annotations, size=layer.size)
            entry.blob, entry.ranges, entry.toc = checked.blob, checked.ranges, checked.toc
        except Exception as exc:  # the Prepare then reads it itself, and reports any failure
            log.info("layer TOC not read ahead digest=%s reason=%s", layer.digest,
                     f"{type(exc).__name__}: {exc}"[:300])
        finally:
            entry.done.set()
        if entry.toc is not None:
            try:
                entry.index = await build_index_off_loop(entry.toc, inline_limit=0)
                log.debug("layer TOC read ahead digest=%s entries=%d", layer.digest,
                          entry.index.entry_count)
            except Exception as exc:  # the attached layer reports it (fusefs.pending)
                entry.build_error = exc
                log.info("layer index not built ahead digest=%s reason=%s", layer.digest,
                         f"{type(exc).__name__}: {exc}"[:300])
        entry.built.set()
        # A pull given up before its Prepare must not keep a built index for good: without
        # this, only a later read-ahead would drop it.
        await trio.sleep_until(entry.created + self._lifetime)
        if self._entries.get(layer.digest) is entry:
            del self._entries[layer.digest]
            log.debug("layer TOC read ahead dropped, never taken digest=%s", layer.digest)
