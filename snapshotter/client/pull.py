"""Pull an image into containerd, or unpack one containerd already has, for a snapshotter.

The registry side is async: trio, through ``registry``. containerd's client is synchronous
gRPC. ``pull`` fetches the small documents in trio, then runs the containerd work in a worker
thread. Layer blobs the unpacker needs are downloaded by hopping back into trio with
``trio.from_thread``, so the trio thread never blocks on gRPC.

trio is imported where it is used: ``lazysnap pull --snapshotter-address`` stores and unpacks
what the daemon resolved, through ``client.documents.documents_from_answer``, and needs no trio
unless a layer's blob must be fetched.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from registry import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    RangeNotSupportedError,
    Reference,
    parse_manifest,
    parse_reference,
    select_manifest,
)
from snapshotter.client.chain import index_gc_labels, manifest_gc_labels
from snapshotter.client.containerd_api import ContainerdAPI, ImageRecord, ingest_ref
from snapshotter.client.direct_apply import DirectApplier
from snapshotter.client.documents import ImageDocuments, fetch_documents
from snapshotter.client.fetch_settings import FetchSettings
from snapshotter.client.parallel_fetch import ParallelFetcher
from snapshotter.client.progress import LayerResult, Progress
from snapshotter.client.soci_check import has_soci_index
from snapshotter.client.unpacker import (
    BlobSource,
    Unpacker,
    UnpackError,
    UnpackPlan,
    plan_unpack,
)
from snapshotter.daemon_api import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES
from snapshotter.errors import NotFoundError

if TYPE_CHECKING:
    from trio.lowlevel import TrioToken

    # Only named here: the client and its blobs import httpx, which a pull through the daemon
    # needs only when a layer must be fetched.
    from registry import RegistryClient, RemoteBlob

# Told the unpack plan before anything is stored: ``lazysnap pull`` lets the daemon start
# reading the lazy layers' TOCs while containerd stores the manifest and config.
Announce = Callable[[UnpackPlan], None]

log = logging.getLogger(__name__)

MAX_DOCUMENT = MAX_MANIFEST_BYTES  # manifests and indexes; the distribution spec's limit
MAX_CONFIG = MAX_CONFIG_BYTES
READ_CHUNK = 1024 * 1024
FETCH_RANGE = 8 * 1024 * 1024  # one ranged GET; large enough that round trips do not matter


def _parse_documents(
    target: Descriptor,
    target_content: bytes,
    platform: Platform | None,
) -> tuple[Index | None, Descriptor]:
    """The index, or None when the target is a manifest, and the descriptor of the manifest to
    unpack."""
    parsed = parse_manifest(target_content, target.media_type)
    if isinstance(parsed, Manifest):
        return None, target
    return parsed, select_manifest(parsed, platform)


class RegistryBlobs:
    """Layer blobs streamed from the registry in large ranges, so that progress shows the fetch
    and nothing lands on local disk; containerd verifies the digest as it commits the blob.

    A registry that cannot serve ranges gets one whole, verified download into ``scratch``.
    ``open`` runs in a worker thread started by ``trio.to_thread``, or in any thread given the
    token of the trio loop that owns ``registry``. Every registry call hops back into trio.
    """

    def __init__(
        self,
        registry: RegistryClient,
        ref: Reference,
        scratch: Path,
        trio_token: TrioToken | None = None,
    ) -> None:
        self._registry = registry
        self._ref = ref
        self._scratch = scratch
        self._token = trio_token

    @contextlib.contextmanager
    def open(self, layer: Descriptor) -> Iterator[Iterable[bytes]]:
        import trio  # noqa: PLC0415 - lazy, as the module docstring says

        hop = trio.from_thread.run
        token = self._token
        blob = hop(self._registry.open_blob, self._ref, layer.digest, layer.size, trio_token=token)
        try:
            first = hop(blob.read_at, 0, min(FETCH_RANGE, layer.size), trio_token=token)
        except RangeNotSupportedError:
            log.info("pull range-unsupported digest=%s fallback=download", layer.digest)
            path = self._scratch / layer.digest.replace(":", "-")
            hop(self._registry.download_blob, self._ref, layer.digest, path, trio_token=token)
            try:
                yield _file_chunks(path)
            finally:
                path.unlink(missing_ok=True)
            return
        yield _ranges(blob, first, token)


def _ranges(blob: RemoteBlob, first: bytes, token: TrioToken | None) -> Iterator[bytes]:
    import trio  # noqa: PLC0415 - lazy, as the module docstring says

    yield first
    offset = len(first)
    while offset < blob.size:
        length = min(FETCH_RANGE, blob.size - offset)
        yield trio.from_thread.run(blob.read_at, offset, length, trio_token=token)
        offset += length


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as blob:
        while chunk := blob.read(READ_CHUNK):
            yield chunk


def store_blob(
    api: ContainerdAPI, data: bytes, digest: str, labels: Mapping[str, str] | None = None
) -> None:
    """Put a small blob into containerd's content store with ``labels``. A blob already there
    gets the labels too."""
    written = api.write_content(
        ingest_ref(digest), [data], expected=digest, total=len(data), labels=labels
    )
    if not written and labels:
        api.set_content_labels(digest, labels)


def gc_labels_for_manifest(manifest: Manifest) -> dict[str, str]:
    return manifest_gc_labels(manifest.config.digest, [layer.digest for layer in manifest.layers])


def store_and_unpack(
    api: ContainerdAPI,
    image: ImageDocuments,
    snapshotter: str,
    blobs: BlobSource,
    progress: Progress,
    announce: Announce | None = None,
    direct: DirectApplier | None = None,
) -> list[LayerResult]:
    """Store the documents with containerd's GC labels, unpack, then name the image - all under
    one lease, so a failure leaves nothing that containerd would keep. With ``direct``, the
    layers that are not lazy are downloaded in parallel and unpacked while they arrive."""
    plan = plan_unpack(image.name, image.manifest_digest, image.manifest, image.config)
    if announce is not None:
        announce(plan)
    with api.lease():
        store_blob(api, image.config, image.manifest.config.digest)
        store_blob(
            api, image.manifest_content, image.manifest_digest,
            gc_labels_for_manifest(image.manifest),
        )
        if image.index is not None:
            store_blob(
                api, image.target_content, image.target.digest,
                index_gc_labels([m.digest for m in image.index.manifests]),
            )
        unpacker = Unpacker(api, snapshotter, blobs=blobs, progress=progress, direct=direct)
        results = unpacker.unpack(plan)
        api.put_image(ImageRecord(image.name, image.target))
    return results


async def pull(
    api: ContainerdAPI,
    registry: RegistryClient,
    ref: Reference,
    snapshotter: str,
    platform: Platform | None,
    progress: Progress,
    announce: Announce | None = None,
    parallel: FetchSettings | None = None,
) -> tuple[ImageDocuments, list[LayerResult]]:
    """``parallel``: how to download the layers that are not lazy in parallel; None for
    containerd's way, one whole blob after the other."""
    import trio  # noqa: PLC0415 - lazy, as the module docstring says

    image = await fetch_documents(registry, ref, platform)
    with tempfile.TemporaryDirectory(prefix="lazysnap-pull-") as scratch:
        blobs = RegistryBlobs(registry, ref, Path(scratch))
        async with trio.open_nursery() as nursery:
            fetcher: ParallelFetcher | None = None
            direct: DirectApplier | None = None
            if parallel is not None:
                fetcher = ParallelFetcher(
                    registry, ref, Path(scratch), nursery, trio.lowlevel.current_trio_token(),
                    parallel,
                )
                direct = DirectApplier(api, fetcher, progress,
                                       soci_indexed=await has_soci_index(registry, ref, image))
            failure: Exception | None = None
            try:
                results = await trio.to_thread.run_sync(
                    store_and_unpack, api, image, snapshotter, blobs, progress, announce, direct
                )
            except Exception as exc:  # raised below as it is, not in the nursery's group
                failure = exc
            finally:
                if fetcher is not None:
                    fetcher.close()
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
    return image, results


# -- unpack ---------------------------------------------------------------------------------


def find_image(api: ContainerdAPI, name: str) -> ImageRecord:
    """containerd's record for ``name``, also when given in short form (``busybox``)."""
    candidates = [name]
    with contextlib.suppress(ValueError):
        normalised = str(parse_reference(name))
        if normalised != name:
            candidates.append(normalised)
    for candidate in candidates:
        try:
            return api.get_image(candidate)
        except NotFoundError:
            continue
    raise NotFoundError(f"image {name!r} is not in containerd (see `ctr images ls`)")


def load_documents(
    api: ContainerdAPI, record: ImageRecord, platform: Platform | None
) -> ImageDocuments:
    """The documents of an image containerd already has, from its content store."""
    target_content = api.read_content(record.target.digest, max_size=MAX_DOCUMENT)
    index, chosen = _parse_documents(record.target, target_content, platform)
    manifest_content = (
        target_content if index is None else api.read_content(chosen.digest, max_size=MAX_DOCUMENT)
    )
    manifest = parse_manifest(manifest_content, chosen.media_type)
    if not isinstance(manifest, Manifest):
        raise UnpackError(f"{chosen.digest} is not an image manifest")
    config = api.read_content(manifest.config.digest, max_size=MAX_CONFIG)
    return ImageDocuments(
        record.name, record.target, target_content, index, chosen.digest, manifest_content,
        manifest, config,
    )


def unpack_existing(
    api: ContainerdAPI,
    name: str,
    snapshotter: str,
    platform: Platform | None,
    progress: Progress,
    blobs: BlobSource | None = None,
) -> tuple[ImageDocuments, list[LayerResult]]:
    """Unpack an image containerd has into ``snapshotter``. Layer blobs missing from containerd's
    content store come from ``blobs``, or are an error without it."""
    image = load_documents(api, find_image(api, name), platform)
    plan = plan_unpack(image.name, image.manifest_digest, image.manifest, image.config)
    with api.lease():
        results = Unpacker(api, snapshotter, blobs=blobs, progress=progress).unpack(plan)
    return image, results


async def unpack_fetching(
    api: ContainerdAPI,
    registry: RegistryClient,
    name: str,
    snapshotter: str,
    platform: Platform | None,
    progress: Progress,
) -> tuple[ImageDocuments, list[LayerResult]]:
    """``unpack_existing`` that fetches missing layer blobs from the image's registry."""
    import trio  # noqa: PLC0415 - lazy, as the module docstring says

    record = await trio.to_thread.run_sync(find_image, api, name)
    ref = parse_reference(record.name)
    with tempfile.TemporaryDirectory(prefix="lazysnap-unpack-") as scratch:
        blobs = RegistryBlobs(registry, ref, Path(scratch))
        return await trio.to_thread.run_sync(
            unpack_existing, api, record.name, snapshotter, platform, progress, blobs
        )
