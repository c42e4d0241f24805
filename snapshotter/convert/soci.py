"""``lazysnap index``: build a zTOC for each large gzip layer of an image and push a SOCI index,
leaving every layer blob as it is.

Each indexed layer is downloaded to a temporary file (the download verifies its digest), its
zTOC is built from that file in a worker thread, then pushed. Then the SOCI index:

- v2 (soci's current format, the default): the index manifest by digest, the image manifest
  with the ``com.amazon.soci.index-digest`` annotation by digest, and last an image index
  holding both under the tag. The tag is the only thing that changes, and it changes last.
- v1: the index manifest by digest, with the image manifest as its subject. A registry with
  the referrers API lists it from then on; for one without, the referrers tag
  (``sha256-<hex>`` of the image manifest) gets an image index that lists it.

``index_manifest_v1`` is the v1 path for a manifest already at hand and blobs from elsewhere:
the daemon's ``[index] publish`` reads them back from containerd's content store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from fusefs import DEFAULT_SPAN_SIZE, ZtocBuild, ZtocBuildError, build_ztoc
from registry import (
    Descriptor,
    Manifest,
    NotFoundError,
    Platform,
    Reference,
    RegistryClient,
    ResolvedImage,
    fallback_tag,
)
from snapshotter import soci_index as si
from snapshotter.convert.soci_documents import (
    DOCKER_MANIFEST,
    IndexDocumentError,
    LayerPlan,
    config_platform,
    oci_typed_manifest,
    plan_layers,
    referrers_tag_index,
    soci_enabled_index,
    soci_enabled_manifest,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MIN_LAYER_SIZE = 10 * MiB  # soci's default
BUILD_TOOL = "lazysnap"
MAX_CONFIG_BYTES = 8 * MiB
DEFAULT_TAG = "latest"


class IndexImageError(Exception):
    """The image cannot be indexed as asked; nothing was tagged."""


@dataclass(frozen=True, slots=True)
class IndexOptions:
    version: si.Version = 2
    platform: Platform | None = None  # None: this machine's
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    span_size: int = DEFAULT_SPAN_SIZE
    tag: str | None = None  # v2: the tag to write; None: the image's own tag
    work_dir: Path | None = None  # temporary layer files; by default the system's temp dir


@dataclass(frozen=True, slots=True)
class LayerIndexReport:
    number: int  # 1-based
    total: int
    layer: Descriptor
    skip_reason: str | None
    ztoc: ZtocBuild | None = None
    download_seconds: float = 0.0
    build_seconds: float = 0.0
    uploaded: bool = False  # False: the repository had the zTOC already

    def line(self) -> str:
        size = self.layer.size / 1e6
        head = f"layer {self.number}/{self.total} {self.layer.digest} {size:.1f} MB"
        if self.ztoc is None:
            return f"{head} skipped: {self.skip_reason}"
        return (
            f"{head} -> zTOC {self.ztoc.digest} {len(self.ztoc.data) / 1e3:.1f} kB "
            f"({self.ztoc.spans} spans, {self.ztoc.entries} entries) "
            f"built in {self.build_seconds:.2f} s"
        )


@dataclass(frozen=True, slots=True)
class IndexResult:
    version: si.Version
    manifest_digest: str  # the image manifest that was indexed
    platform: Platform | None
    index_digest: str  # the SOCI index manifest
    index_size: int
    layers: tuple[LayerIndexReport, ...]
    tagged: Reference | None = None  # v2: the tag now naming the SOCI-enabled image
    image_digest: str | None = None  # v2: the image index under that tag
    enabled_manifest_digest: str | None = None  # v2: the annotated image manifest
    referrers: Literal["api", "tag"] | None = None  # v1: how readers find the index
    referrers_tag: str | None = None  # v1 on a registry without the referrers API


LayerCallback = Callable[[LayerIndexReport], None]
# Writes the layer's blob to the path, its digest verified; raises if the bytes do not match.
BlobFetch = Callable[[Descriptor, Path], Awaitable[None]]


async def index_image(
    client: RegistryClient,
    image: Reference,
    options: IndexOptions,
    on_layer: LayerCallback | None = None,
) -> IndexResult:
    """Index ``image`` for ``options.platform`` and push the SOCI index; see the module doc."""
    if options.span_size <= 0 or options.min_layer_size < 0:
        raise IndexImageError("the span size must be positive, the minimum layer size not negative")
    # A reference without tag or digest means "latest", as everywhere else.
    tag = options.tag or image.tag or (DEFAULT_TAG if image.digest is None else None)
    if options.version == 2 and tag is None:
        raise IndexImageError(f"{image}: a v2 index is written under a tag: give --tag")
    resolved = await client.resolve_image(image, options.platform)
    plans = plan_layers(resolved.manifest.layers, options.min_layer_size)
    if not any(plan.indexed for plan in plans):
        reasons = "; ".join(f"{p.layer.digest}: {p.skip_reason}" for p in plans)
        raise IndexImageError(f"no layer to index: {reasons or 'the image has no layers'}")
    repository = Reference(image.domain, image.path)
    fetch = _registry_fetch(client, repository)
    reports = await _build_ztocs(client, repository, plans, options, on_layer, fetch)
    if options.version == 1:
        return await _push_v1(
            client, repository, resolved.manifest, resolved.manifest_digest,
            len(resolved.manifest_content), resolved.platform, reports, options,
        )  # fmt: skip
    index = si.SociIndex(2, _ztoc_descriptors(reports, options), None, build_tool=BUILD_TOOL)
    body, index_digest = await _push_index(client, repository, index)
    result = IndexResult(
        options.version, resolved.manifest_digest, resolved.platform, index_digest, len(body),
        tuple(reports),
    )  # fmt: skip
    assert tag is not None
    tagged = Reference(image.domain, image.path, tag)
    return await _tag_soci_enabled_image(client, tagged, resolved, body, result)


async def index_manifest_v1(
    client: RegistryClient,
    repository: Reference,
    manifest: Manifest,
    manifest_digest: str,
    manifest_size: int,
    options: IndexOptions,
    fetch: BlobFetch,
) -> IndexResult:
    """Index the image ``manifest`` names with layer blobs from ``fetch``, and push a v1 SOCI
    index with it as subject to ``repository``. The index manifest is pushed after every zTOC
    and the referrers tag after the index, so a reader never finds an index it cannot read."""
    if options.span_size <= 0 or options.min_layer_size < 0:
        raise IndexImageError("the span size must be positive, the minimum layer size not negative")
    plans = plan_layers(manifest.layers, options.min_layer_size)
    if not any(plan.indexed for plan in plans):
        raise IndexImageError("no layer to index")
    reports = await _build_ztocs(client, repository, plans, options, None, fetch)
    return await _push_v1(
        client, repository, manifest, manifest_digest, manifest_size, None, reports, options
    )


async def _push_index(
    client: RegistryClient, repository: Reference, index: si.SociIndex
) -> tuple[bytes, str]:
    body = si.build(index)
    # Registries check that a manifest's config exists, even this two-byte one.
    await client.push_blob(repository, si.EMPTY_CONFIG, media_type=index.artifact_type)
    index_digest = await client.push_manifest(repository, body, si.OCI_MANIFEST)
    log.info("index pushed-soci-index digest=%s version=%d ztocs=%d",
             index_digest, index.version, len(index.ztocs))  # fmt: skip
    return body, index_digest


async def _push_v1(
    client: RegistryClient,
    repository: Reference,
    manifest: Manifest,
    manifest_digest: str,
    manifest_size: int,
    platform: Platform | None,
    reports: list[LayerIndexReport],
    options: IndexOptions,
) -> IndexResult:
    subject = si.Subject(manifest.media_type, manifest_digest, manifest_size)
    index = si.SociIndex(1, _ztoc_descriptors(reports, options), subject, build_tool=BUILD_TOOL)
    body, index_digest = await _push_index(client, repository, index)
    how, fallback = await _list_referrer(client, repository, manifest_digest, body, index_digest)
    return IndexResult(
        1, manifest_digest, platform, index_digest, len(body), tuple(reports),
        referrers=how, referrers_tag=fallback,
    )  # fmt: skip


def _registry_fetch(client: RegistryClient, repository: Reference) -> BlobFetch:
    async def fetch(layer: Descriptor, path: Path) -> None:
        await client.download_blob(repository, layer.digest, path)

    return fetch


def _ztoc_descriptors(
    reports: list[LayerIndexReport], options: IndexOptions
) -> dict[str, si.ZtocDescriptor]:
    return {
        r.layer.digest: si.ZtocDescriptor(
            r.ztoc.digest, len(r.ztoc.data), r.layer.digest, r.layer.media_type, options.span_size
        )
        for r in reports
        if r.ztoc is not None
    }


async def _tag_soci_enabled_image(
    client: RegistryClient,
    tagged: Reference,
    resolved: ResolvedImage,
    index_body: bytes,
    result: IndexResult,
) -> IndexResult:
    """v2: the annotated image manifest by digest, then the image index under the tag."""
    repository = Reference(tagged.domain, tagged.path)
    try:
        platform = resolved.platform
        if platform is None:
            config = await client.fetch_blob(
                repository, resolved.manifest.config.digest, max_size=MAX_CONFIG_BYTES
            )
            platform = config_platform(config)
        manifest = soci_enabled_manifest(resolved.manifest_content, result.index_digest)
        manifest_digest = _sha256(manifest)
        retyped = await _retype_other_platforms(client, repository, resolved)
        top = resolved.target_content if resolved.index is not None else None
        image_index = soci_enabled_index(
            top, resolved.manifest_digest, manifest, manifest_digest, index_body,
            result.index_digest, platform, retyped,
        )  # fmt: skip
    except IndexDocumentError as exc:
        raise IndexImageError(str(exc)) from exc
    await client.push_manifest(repository, manifest, si.OCI_MANIFEST)
    image_digest = await client.push_manifest(tagged, image_index, si.OCI_INDEX)
    log.info("index tagged image=%s digest=%s", tagged, image_digest)
    return dataclasses.replace(
        result, tagged=tagged, image_digest=image_digest, enabled_manifest_digest=manifest_digest
    )


async def _retype_other_platforms(
    client: RegistryClient, repository: Reference, resolved: ResolvedImage
) -> dict[str, tuple[str, int]]:
    """Other platforms' Docker manifests, pushed typed OCI as soci does; old digest to new."""
    retyped: dict[str, tuple[str, int]] = {}
    if resolved.index is None:
        return retyped
    for entry in resolved.index.manifests:
        if entry.media_type != DOCKER_MANIFEST or entry.digest == resolved.manifest_digest:
            continue
        content = await client.fetch_manifest(repository, entry.digest)
        body = oci_typed_manifest(content.content)
        retyped[entry.digest] = (await client.push_manifest(repository, body, si.OCI_MANIFEST),
                                 len(body))  # fmt: skip
    return retyped


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _list_referrer(
    client: RegistryClient, repository: Reference, subject: str, body: bytes, digest: str
) -> tuple[Literal["api", "tag"], str | None]:
    """v1: a registry with the referrers API lists the index itself once it is pushed; for
    one without, the referrers tag's image index gains it."""
    if await client.list_referrers(repository, subject) is not None:
        return "api", None
    tag = fallback_tag(subject)
    try:
        existing: bytes | None = (await client.fetch_manifest(repository, tag)).content
    except NotFoundError:
        existing = None
    try:
        listing = referrers_tag_index(existing, body, digest)
    except (IndexDocumentError, si.SociIndexError) as exc:
        raise IndexImageError(f"referrers tag {tag}: {exc}") from exc
    listed = Reference(repository.domain, repository.path, tag)
    await client.push_manifest(listed, listing, si.OCI_INDEX)
    log.info("index listed-referrer tag=%s index=%s", tag, digest)
    return "tag", tag


async def _build_ztocs(
    client: RegistryClient,
    repository: Reference,
    plans: list[LayerPlan],
    options: IndexOptions,
    on_layer: LayerCallback | None,
    fetch: BlobFetch,
) -> list[LayerIndexReport]:
    work = Path(await trio.to_thread.run_sync(_make_work_dir, options.work_dir))
    reports = []
    try:
        for number, plan in enumerate(plans, 1):
            if plan.indexed:
                report = await _index_layer(client, repository, plan.layer, options, work, fetch)
            else:
                report = LayerIndexReport(0, 0, plan.layer, plan.skip_reason)
            report = dataclasses.replace(report, number=number, total=len(plans))
            reports.append(report)
            if on_layer is not None:
                on_layer(report)
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, work, True)
    return reports


async def _index_layer(
    client: RegistryClient,
    repository: Reference,
    layer: Descriptor,
    options: IndexOptions,
    work: Path,
    fetch: BlobFetch,
) -> LayerIndexReport:
    """Fetch (digest verified), build the zTOC, push it; the layer file is removed after."""
    path = work / "layer.gz"
    started = time.monotonic()
    try:
        await fetch(layer, path)
        downloaded = time.monotonic()

        def build() -> ZtocBuild:
            with path.open("rb") as blob:
                return build_ztoc(blob, span_size=options.span_size, build_tool=BUILD_TOOL)

        try:
            # Inflating is CPU-bound and zlib releases the GIL: a worker thread keeps the
            # event loop, and with it the registry connections, responsive.
            ztoc = await trio.to_thread.run_sync(build)
        except ZtocBuildError as exc:
            raise IndexImageError(f"layer {layer.digest}: {exc}") from exc
        built = time.monotonic()
    finally:
        await trio.to_thread.run_sync(_unlink, path)
    uploaded = not await _has_blob(client, repository, ztoc.digest)
    if uploaded:
        await client.push_blob(repository, ztoc.data, media_type=si.ZTOC_MEDIA_TYPE)
    return LayerIndexReport(
        0, 0, layer, None, ztoc, downloaded - started, built - downloaded, uploaded
    )


async def _has_blob(client: RegistryClient, repository: Reference, digest: str) -> bool:
    try:
        await client.stat_blob(repository, digest)
    except NotFoundError:
        return False
    return True


def _make_work_dir(parent: Path | None) -> str:
    return tempfile.mkdtemp(prefix="lazysnap-index-", dir=parent)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
