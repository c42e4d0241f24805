"""Lazily served layers: decide from a Prepare's labels, open the blob, read its TOC, attach it
under the FUSE mount.

Everything here runs on the trio thread. The gRPC threads reach it through
``snapshotter.remote.bridge.TrioBridge``, one ``trio.from_thread`` hop per call.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from fusefs import BlobReader, LayerFormatError, LayerIndex, LazyFilesystem, build_index_off_loop
from registry import (
    CredentialProvider,
    Manifest,
    Reference,
    RegistryClient,
    RegistryError,
    parse_manifest,
    parse_reference,
)
from snapshotter.client.documents import ImageDocuments
from snapshotter.labels import SOCI_ZTOC_DIGEST
from snapshotter.lazy_formats import LazyFormat, plain_gzip
from snapshotter.remote import fallback
from snapshotter.remote.decision import RemoteDecision, RemoteLayerRequest, classify, decide
from snapshotter.remote.fallback import LazyFallback
from snapshotter.remote.open_layer import (
    CheckedToc,
    OpenedLayer,
    check_layer_toc,
    expected_toc_digest,
    index_ztoc_layer,
    open_layer_toc,
    open_ztoc_layer,
)
from snapshotter.remote.profiles import StartupProfiles
from snapshotter.remote.refused_reads import ImageNamedBlob
from snapshotter.remote.report import LayersReport, building_report, layer_report
from snapshotter.remote.resolve import check_access, fetch_image_documents
from snapshotter.remote.saved_toc import (
    DeferredBlob,
    SavedTocError,
    load_saved_toc,
    registry_bytes,
    save_toc_ranges,
)
from snapshotter.remote.soci import SociIndexes
from snapshotter.remote.toc_ahead import AheadLayer, TocReadAhead
from snapshotter.soci_index import IMAGE_INDEX_DIGEST, SociIndexError, index_digest_of
from snapshotter.store.metadata import RemoteLayerRecord
from snapshotter.store.remote import AttachedLayer

log = logging.getLogger(__name__)

# containerd waits on the Prepare for the manifest, the blob's size, its footer and TOC.
ATTACH_TIMEOUT_SECONDS = 30.0
USAGE_WRITE_WAIT_SECONDS = 0.5
# CRI sends every layer of an image with the same cri.manifest-digest: a few images' worth.
MANIFEST_CACHE_SIZE = 64


@dataclass(frozen=True, slots=True)
class ProfiledLayer:
    """A layer attached for one image manifest: what startup profiles are about."""

    image_ref: str
    manifest_digest: str
    layer_digest: str
    layer_id: str


class LazyLayers:
    """The lazily served layers of one FUSE mount and one registry client."""

    def __init__(
        self,
        fs: LazyFilesystem,
        client: RegistryClient,
        tail_path: Callable[[str], Path],
        *,
        background_fetch: bool = True,
        use_profiles: bool = True,
        on_attached: Callable[[ProfiledLayer], None] | None = None,
    ) -> None:
        """``use_profiles``: look up each image's startup profile and prefetch from it
        (``[profile] prefetch``). ``on_attached``: told of every layer attached for an image
        manifest, for ``[profile] publish``."""
        self._fs = fs
        self._use_profiles = use_profiles
        self.on_attached = on_attached
        self.profiles = StartupProfiles(client)
        self._client = client
        self._saved_toc_path = tail_path  # where a layer's footer/TOC ranges are saved
        self._background_fetch = background_fetch
        self._manifests: OrderedDict[str, Manifest | None] = OrderedDict()
        self._ahead = TocReadAhead(client)
        self.soci = SociIndexes(client)
        self._digests: dict[str, str] = {}  # attached layer id -> blob digest
        self._described: dict[str, tuple[str, str]] = {}  # layer id -> (image, format)
        self._blobs: dict[str, BlobReader] = {}  # layer id -> its reader, for status
        self.fallbacks = dict.fromkeys(fallback.REASONS, 0)  # Prepares served the ordinary way

    async def resolve(self, image: str, platform: str) -> ImageDocuments:
        """An image's documents through this daemon's registry client (``Daemon/Resolve``): its
        connections, tokens and credentials are already warm from earlier layers."""
        return await fetch_image_documents(self._client, image, platform)

    async def check_access(
        self, credentials: CredentialProvider, registry: str, ref: Reference | None
    ) -> None:
        """Whether the registry accepts ``credentials`` (``Daemon/SetCredentials``)."""
        await check_access(self._client, credentials, registry, ref)

    async def mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        """Serve the layer a Prepare's labels describe at ``<mountpoint>/<layer_id>``; raise
        RemoteLayerError with the reason when it cannot be served lazily. Each such fallback is
        counted by reason and logged as a ``remote_fallback`` event."""
        started = trio.current_time()
        try:
            attached = await self._mount(labels, layer_id)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, LazyFallback) else fallback.INTERNAL_ERROR
            self.fallbacks[reason] += 1
            image, digest = _described_by(labels)
            log.info("lazy pulling not used layer=%s reason=%s detail=%s", layer_id, reason,
                     exc, extra={"event": "remote_fallback", "reason": reason, "image": image,
                                 "digest": digest})
            raise
        self._fs.meters(layer_id).mount_millis.observe((trio.current_time() - started) * 1e3)
        return attached

    async def _mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        decision = decide(labels)
        if decision is None:
            raise LazyFallback(fallback.LABELS_INVALID,
                               "not a layer extraction: no containerd.io/snapshot.ref label")
        if decision.needs_manifest:
            decision = await self._decide_with_manifest(decision)
        if decision.soci and decision.request is not None:
            return await self._attach_soci(decision.request, layer_id)
        if decision.request is None:
            raise LazyFallback(fallback.LABELS_INVALID, decision.reason)
        if decision.format is None:
            raise LazyFallback(fallback.NOT_LAZY_FORMAT, decision.reason)
        return await self._attach(decision.request, decision.format, layer_id)

    async def _decide_with_manifest(self, decision: RemoteDecision) -> RemoteDecision:
        try:
            return await self._classify_from_manifest(decision)
        except trio.TooSlowError:
            raise LazyFallback(
                fallback.MANIFEST_UNAVAILABLE,
                f"manifest lookup failed: no answer within {ATTACH_TIMEOUT_SECONDS:.0f}s",
            ) from None
        except (RegistryError, ValueError) as exc:
            raise LazyFallback(fallback.MANIFEST_UNAVAILABLE,
                               f"manifest lookup failed: {type(exc).__name__}: {exc}") from exc

    async def _classify_from_manifest(self, decision: RemoteDecision) -> RemoteDecision:
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
        soci = fmt is None and plain_gzip(layer.media_type, annotations)
        if soci and IMAGE_INDEX_DIGEST in manifest.annotations:
            annotations[IMAGE_INDEX_DIGEST] = manifest.annotations[IMAGE_INDEX_DIGEST]
        enriched = RemoteLayerRequest(
            request.chain_ref, request.image_ref, request.layer_digest, request.manifest_digest,
            request.image_layers, annotations, layer.media_type,
        )
        return RemoteDecision(enriched, fmt, reason + " (from the manifest)", soci=soci)

    async def _manifest(self, image_ref: str, digest: str) -> Manifest | None:
        """The image manifest named by digest, or None for an index. It is immutable, so cached."""
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

    async def _attach(
        self, request: RemoteLayerRequest, fmt: LazyFormat, layer_id: str
    ) -> AttachedLayer:
        ref = parse_reference(request.image_ref)
        self._read_neighbours_ahead(request)
        started = trio.current_time()
        try:
            with trio.fail_after(ATTACH_TIMEOUT_SECONDS):
                ahead = await self._ahead.take(
                    request.layer_digest,
                    toc_digest=expected_toc_digest(request.annotations),
                    annotations=request.annotations,
                )
                build: Callable[[], Awaitable[LayerIndex]] | None = None
                if ahead is None:
                    checked = await open_layer_toc(self._client, ref, request.layer_digest,
                                                   request.annotations)
                elif ahead.toc is None or ahead.built is None:
                    checked = await check_layer_toc(ahead.blob, request.annotations,
                                                    saved=ahead.ranges)
                else:  # checked with these digests, and indexed (or being indexed) ahead
                    checked = CheckedToc(ahead.blob, ahead.ranges, ahead.toc)
                    build = ahead.built
        except trio.TooSlowError:
            raise LazyFallback(
                fallback.REGISTRY_TIMEOUT,
                f"registry did not answer within {ATTACH_TIMEOUT_SECONDS:.0f}s",
            ) from None
        except RegistryError as exc:
            raise LazyFallback(fallback.REGISTRY_ERROR, f"{type(exc).__name__}: {exc}") from exc
        except LayerFormatError as exc:
            raise LazyFallback(fallback.INDEX_INVALID, f"{type(exc).__name__}: {exc}") from exc
        how = "read-ahead" if ahead is not None else "read"
        toc = checked.toc
        # Answered now: the index is built after the Prepare returns, and lookups of the
        # layer wait for it (fusefs.pending). Everything that can make containerd fall back to
        # an ordinary pull (registry errors, digest mismatch, unknown format) happened above.
        built = build or (lambda: build_index_off_loop(toc, inline_limit=0))
        return await self._serve(request, fmt, layer_id, checked.blob, checked.ranges,
                                 dict(request.annotations), how, trio.current_time() - started,
                                 toc_digest=toc.json_digest, build=built)

    async def _attach_soci(self, request: RemoteLayerRequest, layer_id: str) -> AttachedLayer:
        """Serve a plain gzip layer through the zTOC its image's SOCI index lists for it."""
        assert request.manifest_digest is not None
        started = trio.current_time()
        ref = parse_reference(request.image_ref)
        try:
            index_digest = index_digest_of(request.annotations)
        except SociIndexError as exc:
            raise LazyFallback(fallback.INDEX_INVALID, f"SociIndexError: {exc}") from exc
        ztoc = await self.soci.ztoc_for(
            ref, request.manifest_digest, index_digest, request.layer_digest
        )
        if ztoc is None:
            raise LazyFallback(fallback.NOT_LAZY_FORMAT,
                               "plain gzip layer that no SOCI index of its image lists")
        try:
            with trio.fail_after(ATTACH_TIMEOUT_SECONDS):
                opened = await open_ztoc_layer(self._client, ref, request.layer_digest, ztoc)
        except trio.TooSlowError:
            raise LazyFallback(
                fallback.REGISTRY_TIMEOUT,
                f"registry did not answer within {ATTACH_TIMEOUT_SECONDS:.0f}s",
            ) from None
        except (RegistryError, LayerFormatError) as exc:
            log.warning("soci ztoc refused layer=%s digest=%s ztoc=%s error=%s: %s", layer_id,
                        request.layer_digest, ztoc.digest, type(exc).__name__, exc)
            reason = (fallback.REGISTRY_ERROR if isinstance(exc, RegistryError)
                      else fallback.INDEX_INVALID)
            raise LazyFallback(reason, f"{type(exc).__name__}: {exc}") from exc
        annotations = {**request.annotations, SOCI_ZTOC_DIGEST: ztoc.digest}
        return await self._serve(request, "soci", layer_id, opened.blob, opened.ranges,
                                 annotations, "ztoc", trio.current_time() - started,
                                 toc_digest=opened.index.toc_digest, index=opened.index,
                                 saved_digest=opened.saved_digest)

    async def _serve(
        self,
        request: RemoteLayerRequest,
        fmt: LazyFormat,
        layer_id: str,
        blob: BlobReader,
        ranges: dict[int, bytes],
        annotations: dict[str, str],
        how: str,
        toc_seconds: float,
        *,
        toc_digest: str,
        index: LayerIndex | None = None,
        build: Callable[[], Awaitable[LayerIndex]] | None = None,
        saved_digest: str | None = None,
    ) -> AttachedLayer:
        """Attach ``index``, or the one ``build`` returns after this answered."""
        await trio.to_thread.run_sync(
            save_toc_ranges, self._saved_toc_path(layer_id), saved_digest or blob.digest, ranges,
        )
        # The filesystem picks the slot: it alone knows which inode numbers the kernel may
        # still hold, and never hands a slot out twice while the connection lives.
        # Named for the operator: a read the registry refuses is logged with its image.
        named = ImageNamedBlob(blob, request.image_ref)
        if index is not None:
            await self._fs.attach(layer_id, named, index, background_fetch=self._background_fetch)
            self._fs.meters(layer_id).toc_get_millis.observe(toc_seconds * 1e3)
            entries = str(index.entry_count)
        else:
            assert build is not None
            self._fs.attach_building(layer_id, named, build,
                                     background_fetch=self._background_fetch)
            self._fs.meters(layer_id).toc_get_millis.observe(toc_seconds * 1e3)
            entries = "building"
        self._digests[layer_id] = blob.digest
        self._described[layer_id] = (request.image_ref, fmt)
        self._blobs[layer_id] = blob
        log.info("remote layer attached layer=%s digest=%s format=%s entries=%s toc=%s",
                 layer_id, blob.digest, fmt, entries, how)
        if request.manifest_digest:
            profiled = ProfiledLayer(request.image_ref, request.manifest_digest,
                                     request.layer_digest, layer_id)
            if self._use_profiles:
                trio.lowlevel.spawn_system_task(self._apply_profile, profiled)
            if self.on_attached is not None:
                self.on_attached(profiled)
        return AttachedLayer(
            layer_id=layer_id,
            slot=self._fs.slot_of(layer_id),
            image_ref=request.image_ref,
            layer_digest=request.layer_digest,
            blob_size=blob.size,
            toc_digest=toc_digest,
            annotations=annotations,
            format=fmt,
        )

    async def _apply_profile(self, layer: ProfiledLayer) -> None:
        """Prefetch the layer's files its image's startup profile lists, once it is known: the
        Prepare does not wait for the lookup, readers start alongside the prefetch."""
        try:
            profile = await self.profiles.profile_of(parse_reference(layer.image_ref),
                                                     layer.manifest_digest)
            await self._fs.wait_built(layer.layer_id)  # its paths are in the index
            files = () if profile is None else profile.files_of(layer.layer_digest)
            if files and self._fs.prefetch_files(layer.layer_id,
                                                 [(f.path, f.read_bytes) for f in files]):
                log.info("startup profile applied layer=%s digest=%s files=%d", layer.layer_id,
                         layer.layer_digest, len(files),
                         extra={"event": "startup_profile_applied"})
        except Exception as exc:  # a system task must not raise; the pull goes on without
            log.warning("startup profile not applied layer=%s error=%r", layer.layer_id, exc)

    def read_ahead(self, layers: Sequence[tuple[Mapping[str, str], int | None]]) -> list[bool]:
        """Start reading the TOCs of layers whose Prepares are announced with their labels and
        blob sizes; for each, whether a read started. A layer the labels show is not lazy is only
        remembered as such; one only its manifest can tell about is left to its Prepare."""
        return [self._read_one_ahead(labels, size) for labels, size in layers]

    def _read_one_ahead(self, labels: Mapping[str, str], size: int | None) -> bool:
        decision = decide(labels)
        if decision is None or decision.request is None or decision.needs_manifest:
            return False
        request = decision.request
        # Only a layer that may be served lazily has a use for its image's profile: an image
        # of other layers costs no registry request.
        may_be_lazy = decision.format is not None or decision.soci
        if self._use_profiles and request.manifest_digest and may_be_lazy:
            with contextlib.suppress(ValueError):
                self.profiles.start(parse_reference(request.image_ref), request.manifest_digest)
        if decision.soci and request.manifest_digest is not None:
            with contextlib.suppress(SociIndexError):  # the Prepare reports it
                self.soci.start(parse_reference(request.image_ref), request.manifest_digest,
                                index_digest_of(request.annotations))
        if decision.format is None:
            self._ahead.not_lazy(request.layer_digest)
            return False
        return self._ahead.start(
            AheadLayer(
                request.image_ref,
                request.layer_digest,
                size if size and size > 0 else None,
                expected_toc_digest(request.annotations),
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
        ztoc_digest = record.annotations.get(SOCI_ZTOC_DIGEST)
        saved: dict[int, bytes] | None
        try:
            saved = await trio.to_thread.run_sync(
                load_saved_toc, self._saved_toc_path(record.layer_id),
                ztoc_digest or record.layer_digest,
            )
        except SavedTocError as exc:
            log.warning("layer=%s tail unusable (%s); reading the TOC from the registry",
                        record.layer_id, exc)
            saved = None
        opened: OpenedLayer | None = None
        checked: CheckedToc | None = None
        try:
            if ztoc_digest is not None:
                data = (saved or {}).get(0)
                if data is None:
                    data = await self._client.fetch_blob(ref, ztoc_digest)
                opened = await index_ztoc_layer(deferred, data, ztoc_digest)
            else:
                checked = await check_layer_toc(deferred, record.annotations, saved=saved,
                                                toc_digest=record.toc_digest)
        except (RegistryError, LayerFormatError, OSError) as exc:
            log.error("remote layer not restored layer=%s digest=%s error=%r",
                      record.layer_id, record.layer_digest, str(exc))
            return
        named = ImageNamedBlob(deferred, record.image_ref)
        if opened is not None:
            await self._fs.attach(record.layer_id, named, opened.index,
                                  background_fetch=self._background_fetch, slot=record.slot)
        else:
            assert checked is not None
            toc = checked.toc
            # Built before this returns: a connection taken over may already hold the layer's
            # inode numbers, which only an attached index answers. A TOC that fails to build
            # leaves the layer failed, every operation EIO, as before the restart.
            self._fs.attach_building(record.layer_id, named, lambda: build_index_off_loop(toc),
                                     background_fetch=self._background_fetch, slot=record.slot)
            await self._fs.wait_built(record.layer_id)
        self._digests[record.layer_id] = record.layer_digest
        self._described[record.layer_id] = (
            record.image_ref, classify(None, record.annotations)[0] or "unknown"
        )
        self._blobs[record.layer_id] = deferred
        log.info("remote layer restored layer=%s digest=%s", record.layer_id, record.layer_digest)

    async def unmount(self, layer_id: str) -> None:
        self._digests.pop(layer_id, None)
        self._described.pop(layer_id, None)
        self._blobs.pop(layer_id, None)
        if layer_id in self._fs.layer_ids() or self._fs.is_building(layer_id):
            await self._fs.detach(layer_id)
            # Its chunk registrations would keep its chunks from Cleanup and its index in memory.
            await self._fs.release_detached_layers()
        await trio.to_thread.run_sync(
            lambda: self._saved_toc_path(layer_id).unlink(missing_ok=True)
        )

    async def reports(self) -> LayersReport:
        """Every attached layer as ``lazysnap status --layers`` shows it. The first report of
        a layer walks its chunk list once to count its cached bytes, as containerd's Usage
        does."""
        with trio.move_on_after(USAGE_WRITE_WAIT_SECONDS):
            await self._fs.writes_done()
        reports = []
        for layer_id in self._fs.layer_ids():
            image, fmt = self._described.get(layer_id, ("", "unknown"))
            blob = self._blobs.get(layer_id)
            await self._fs.track_usage(layer_id)  # the first report's walk, in steps
            reports.append(layer_report(self._fs.usage(layer_id), image, fmt,
                                        self._background_fetch,
                                        None if blob is None else registry_bytes(blob)))
            await trio.lowlevel.checkpoint()  # many layers: let readers in between
        for pending in self._fs.pending_layers():
            image, fmt = self._described.get(pending.layer_id, ("", "unknown"))
            blob = self._blobs.get(pending.layer_id)
            reports.append(building_report(pending.layer_id, pending.digest, pending.failure,
                                           image, fmt, 0 if blob is None else blob.size))
        cache = self._fs.cache_usage()
        return LayersReport(reports, cache.bytes if cache else 0,
                            cache.capacity_bytes if cache else 0)

    async def cached_bytes(self, layer_id: str) -> int:
        if layer_id not in self._fs.layer_ids():
            return 0
        # Readers get chunks before they are written to the cache: count what was read before
        # this call, but never hold a Usage RPC long behind a busy background fetch.
        with trio.move_on_after(USAGE_WRITE_WAIT_SECONDS):
            await self._fs.writes_done()
        await self._fs.track_usage(layer_id)  # the first Usage's walk, in steps
        return self._fs.usage(layer_id).cached_bytes

    async def collect_garbage(
        self, recorded: Mapping[str, str], attaching: Collection[str]
    ) -> tuple[int, int]:
        """Remove cached chunks no remote layer references; return (chunks, bytes).

        ``recorded`` maps the layer id of every ``remote_layers`` row to its blob digest,
        ``attaching`` names layers between attach and their row. A layer among them may not be
        attached: its restore failed, it was detached since, or its index is still being read.
        Such a layer has no known chunk list, so every content-addressed chunk is kept, as it may
        be one of that layer's. So is every digest-less chunk of a recorded layer's blob. The
        blob of a layer still attaching is not known here: its digest-less chunks, if any were
        cached before, may go and would be fetched again.
        """
        attached = set(self._fs.layer_ids())
        unknown = {digest for layer_id, digest in recorded.items() if layer_id not in attached}
        pending = any(layer_id not in attached for layer_id in attaching)
        return await self._fs.collect_garbage(
            keep_blob_digests=sorted(unknown), keep_content_addressed=bool(unknown) or pending
        )


def _described_by(labels: Mapping[str, str]) -> tuple[str, str]:
    """The image reference and layer digest the labels name, for a log line; empty if none."""
    try:
        decision = decide(labels)
    except Exception:  # the labels may be what failed
        return "", ""
    if decision is None or decision.request is None:
        return "", ""
    return decision.request.image_ref, decision.request.layer_digest
