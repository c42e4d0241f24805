"""Remote (lazily served) layers: resolve the blob, read its TOC, attach it under the FUSE mount.

Everything here runs on the trio thread. The gRPC threads reach it through ``RemoteSnapshots``,
which makes exactly one ``trio.from_thread`` hop per call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import trio

from fusefs import BlobReader, LayerFormatError, LazyFilesystem, load_layer_index
from registry import Manifest, RegistryClient, RegistryError, parse_manifest, parse_reference
from snapshotter.client.documents import ImageDocuments
from snapshotter.labels import ESTARGZ_TOC_DIGEST as STARGZ_TOC_DIGEST
from snapshotter.lazy_formats import LazyFormat
from snapshotter.remote.decision import RemoteDecision, RemoteLayerRequest, classify
from snapshotter.remote.resolve import fetch_image_documents
from snapshotter.remote.saved_toc import (
    DeferredBlob,
    RecordingBlob,
    TailFileError,
    TailServedBlob,
    load_tail,
    save_tail,
)
from snapshotter.remote.toc_ahead import AheadLayer, TailsAhead
from snapshotter.store.metadata import RemoteLayerRecord

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

ATTACH_TIMEOUT_SECONDS = 30.0
USAGE_WRITE_WAIT_SECONDS = 0.5
MANIFEST_CACHE_SIZE = 64  # resolve + footer + TOC; containerd waits on this Prepare


class RemoteLayerError(Exception):
    """The layer cannot be served lazily; the message is the logged fallback reason."""


@dataclass(frozen=True, slots=True)
class AttachedLayer:
    layer_id: str
    slot: int
    blob_size: int
    toc_digest: str
    annotations: dict[str, str]


class RemoteLayers:
    def __init__(
        self,
        fs: LazyFilesystem,
        client: RegistryClient,
        tails_dir: Path,
        *,
        background_fetch: bool = True,
    ) -> None:
        self._fs = fs
        self._client = client
        self._tails = tails_dir
        self._background_fetch = background_fetch
        # CRI sends every layer of an image with the same cri.manifest-digest: fetch it once.
        self._manifests: OrderedDict[str, Manifest | None] = OrderedDict()
        self._ahead = TailsAhead(client)
        self._digests: dict[str, str] = {}  # attached layer id -> blob digest

    async def resolve(self, image: str, platform: str) -> ImageDocuments:
        """An image's documents through this daemon's registry client (``Daemon/Resolve``): its
        connections, tokens and credentials are already warm from earlier layers."""
        return await fetch_image_documents(self._client, image, platform)

    def _tail_path(self, layer_id: str) -> Path:
        return self._tails / f"{layer_id}.tail"

    async def decide_with_manifest(self, decision: RemoteDecision) -> RemoteDecision:
        """Fetch the manifest named by cri.manifest-digest to read the layer's annotations."""
        request = decision.request
        assert request is not None and request.manifest_digest
        manifest = await self._manifest(request.image_ref, request.manifest_digest)
        if manifest is None:
            return RemoteDecision(request, None, "cri.manifest-digest names an index")
        layer = next((d for d in manifest.layers if d.digest == request.layer_digest), None)
        if layer is None:
            return RemoteDecision(request, None, "layer digest not in the manifest")
        annotations = {**request.annotations, **dict(layer.annotations)}
        fmt, reason = classify(layer.media_type, annotations)
        enriched = RemoteLayerRequest(
            request.chain_ref, request.image_ref, request.layer_digest, request.manifest_digest,
            request.image_layers, annotations, layer.media_type,
        )
        return RemoteDecision(enriched, fmt, reason + " (from the manifest)")

    async def _manifest(self, image_ref: str, digest: str) -> Manifest | None:
        """The image manifest named by digest (immutable, so cached), or None for an index."""
        key = f"{parse_reference(image_ref).name}@{digest}"
        if key in self._manifests:
            self._manifests.move_to_end(key)
            return self._manifests[key]
        with trio.fail_after(ATTACH_TIMEOUT_SECONDS):
            content = await self._client.fetch_manifest(parse_reference(image_ref), digest)
        parsed = parse_manifest(content.content, content.media_type)
        manifest = parsed if isinstance(parsed, Manifest) else None
        self._manifests[key] = manifest
        if len(self._manifests) > MANIFEST_CACHE_SIZE:
            self._manifests.popitem(last=False)
        return manifest

    async def attach(
        self, request: RemoteLayerRequest, fmt: LazyFormat, layer_id: str, slot: int
    ) -> AttachedLayer:
        ref = parse_reference(request.image_ref)
        toc_digest = request.annotations.get(STARGZ_TOC_DIGEST)
        self._read_neighbours_ahead(request)
        try:
            with trio.fail_after(ATTACH_TIMEOUT_SECONDS):
                ahead = await self._ahead.take(
                    request.layer_digest, toc_digest=toc_digest, annotations=request.annotations
                )
                if ahead is not None:
                    blob: BlobReader = ahead.blob
                    recording = RecordingBlob(TailServedBlob(blob, ahead.ranges))
                    recording.ranges.update(ahead.ranges)
                    index = ahead.index
                else:
                    blob = await self._client.open_blob(ref, request.layer_digest)
                    recording = RecordingBlob(blob)
                    index = None
                if index is None:
                    index = await load_layer_index(
                        recording, toc_digest=toc_digest, annotations=request.annotations
                    )
        except trio.TooSlowError:
            raise RemoteLayerError(
                f"registry did not answer within {ATTACH_TIMEOUT_SECONDS:.0f}s"
            ) from None
        except (RegistryError, LayerFormatError) as exc:
            raise RemoteLayerError(f"{type(exc).__name__}: {exc}") from exc
        await trio.to_thread.run_sync(
            save_tail, self._tail_path(layer_id), blob.digest, recording.ranges
        )
        await self._fs.attach(
            layer_id, blob, index, background_fetch=self._background_fetch, slot=slot
        )
        self._digests[layer_id] = blob.digest
        log.info("remote layer attached layer=%s digest=%s format=%s entries=%d toc=%s",
                 layer_id, blob.digest, fmt, index.entry_count,
                 "read-ahead" if ahead is not None else "read")
        return AttachedLayer(layer_id, slot, blob.size, index.toc_digest,
                             dict(request.annotations))

    def read_ahead(self, decision: RemoteDecision, size: int | None) -> bool:
        """Start reading the TOC of a layer whose Prepare is announced; True if started. A layer
        the labels show is not lazy is only remembered as such."""
        request = decision.request
        if request is None:
            return False
        if decision.format is None:
            self._ahead.not_lazy(request.layer_digest)
            return False
        return self._ahead.start(
            AheadLayer(
                request.image_ref,
                request.layer_digest,
                size,
                request.annotations.get(STARGZ_TOC_DIGEST),
                request.annotations,
            )
        )

    def _read_neighbours_ahead(self, request: RemoteLayerRequest) -> None:
        """containerd prepares an image's layers one after another: read the others' TOCs now.
        Their labels are unknown here, so those indexes are rebuilt with the labels' digests."""
        attached = set(self._digests.values())
        for digest in request.image_layers:
            if digest != request.layer_digest and digest not in attached:
                self._ahead.start(AheadLayer(request.image_ref, digest, None, None, None))

    async def restore(self, record: RemoteLayerRecord) -> None:
        """Re-attach after a restart from the saved tail: no network until a file is read."""
        ref = parse_reference(record.image_ref)

        async def open_remote() -> BlobReader:
            return await self._client.open_blob(ref, record.layer_digest, record.blob_size)

        deferred = DeferredBlob(record.layer_digest, record.blob_size, open_remote)
        try:
            ranges = await trio.to_thread.run_sync(
                load_tail, self._tail_path(record.layer_id), record.layer_digest
            )
            source: BlobReader = TailServedBlob(deferred, ranges)
        except TailFileError as exc:
            log.warning("layer=%s tail unusable (%s); reading the TOC from the registry",
                        record.layer_id, exc)
            source = deferred
        try:
            index = await load_layer_index(
                source, toc_digest=record.toc_digest, annotations=record.annotations
            )
        except (RegistryError, LayerFormatError, OSError) as exc:
            log.error("remote layer not restored layer=%s digest=%s error=%r",
                      record.layer_id, record.layer_digest, str(exc))
            return
        await self._fs.attach(record.layer_id, deferred, index,
                              background_fetch=self._background_fetch, slot=record.slot)
        self._digests[record.layer_id] = record.layer_digest
        log.info("remote layer restored layer=%s digest=%s", record.layer_id, record.layer_digest)

    async def detach(self, layer_id: str) -> None:
        self._digests.pop(layer_id, None)
        if layer_id in self._fs.layer_ids():
            await self._fs.detach(layer_id)
            # Its chunk registrations would keep its chunks from Cleanup and its index in memory.
            await self._fs.release_detached_layers()
        await trio.to_thread.run_sync(
            lambda: self._tail_path(layer_id).unlink(missing_ok=True)
        )

    async def cached_bytes(self, layer_id: str) -> int:
        if layer_id not in self._fs.layer_ids():
            return 0
        # Readers get chunks before they are written to the cache: count what was read before
        # this call, but never hold a Usage RPC long behind a busy background fetch.
        with trio.move_on_after(USAGE_WRITE_WAIT_SECONDS):
            await self._fs.writes_done()
        return self._fs.usage(layer_id).cached_bytes

    async def collect_garbage(
        self, recorded: Mapping[str, str], attaching: Collection[str]
    ) -> tuple[int, int]:
        """Remove cached chunks no remote layer references; return (chunks, bytes).

        ``recorded`` maps the layer id of every ``remote_layers`` row to its blob digest,
        ``attaching`` names layers between attach and their row. A layer among them that is not
        attached (its restore failed, it was detached since, or its index is still being read)
        has no known chunk list: every content-addressed chunk is kept, as it may be one of
        that layer's, and so is every digest-less chunk of a recorded layer's blob (the blob of
        a layer still attaching is not known here; its digest-less chunks, if any were cached
        before, may go and would be fetched again).
        """
        attached = set(self._fs.layer_ids())
        unknown = {digest for layer_id, digest in recorded.items() if layer_id not in attached}
        pending = any(layer_id not in attached for layer_id in attaching)
        return await self._fs.collect_garbage(
            keep_blob_digests=sorted(unknown), keep_content_addressed=bool(unknown) or pending
        )


class RemoteSnapshots:
    """The synchronous face of RemoteLayers for the gRPC threads: one trio hop per call."""

    def __init__(self, layers: RemoteLayers, token: trio.lowlevel.TrioToken) -> None:
        self._layers = layers
        self._token = token

    def _hop(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        async def call() -> T:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._token)

    def decide_with_manifest(self, decision: RemoteDecision) -> RemoteDecision:
        return self._hop(self._layers.decide_with_manifest, decision)

    def attach(
        self, request: RemoteLayerRequest, fmt: LazyFormat, layer_id: str, slot: int
    ) -> AttachedLayer:
        return self._hop(self._layers.attach, request, fmt, layer_id, slot)

    def detach(self, layer_id: str) -> None:
        self._hop(self._layers.detach, layer_id)

    def resolve(self, image: str, platform: str) -> ImageDocuments:
        return self._hop(self._layers.resolve, image, platform)

    def read_ahead(self, announced: list[tuple[RemoteDecision, int | None]]) -> int:
        """Start reading the TOCs of announced layers; how many were started."""

        async def start() -> int:
            return sum(self._layers.read_ahead(decision, size) for decision, size in announced)

        return self._hop(start)

    def cached_bytes(self, layer_id: str) -> int:
        return self._hop(self._layers.cached_bytes, layer_id)

    def collect_garbage(
        self, recorded: Mapping[str, str], attaching: Collection[str]
    ) -> tuple[int, int]:
        return self._hop(self._layers.collect_garbage, recorded, attaching)
