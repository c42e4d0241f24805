"""``lazysnap convert``: read an image from a registry, rewrite its layers as eStargz or
zstd:chunked, and push the result under a new reference.

Order matters for failure safety: layer blobs first, then the new config, and the manifest
last. A failure at any point then leaves nothing under the destination tag, only unreferenced
blobs, which the registry's garbage collection removes.

From an index, one platform is converted and pushed as a plain image manifest; ``--platform``
picks it and defaults to this machine. With ``all_platforms`` every platform's image is pushed
by digest, then a new index under the tag. Index entries that are not platform images are left
out, such as buildx attestations with platform ``unknown/unknown``.

With ``optimize``, for one platform only, a first conversion is pushed by digest only and run
once by ``convert_optimize``. The final one puts the files that run read first.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from fusefs import DEFAULT_CHUNK_SIZE
from registry import (
    Descriptor,
    Index,
    Manifest,
    NotFoundError,
    Platform,
    Reference,
    RegistryClient,
    parse_manifest,
)
from snapshotter.convert.documents import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    TARGET_MEDIA_TYPES,
    ConvertError,
    LayerOut,
    TargetFormat,
    build_index,
    build_manifest,
    check_convertible,
    converted_annotations,
    image_runtime,
    is_platform_image,
    rewrite_config,
    source_diff_ids,
)
from snapshotter.convert.layer import UnreadableLayerError, convert_layer_file
from snapshotter.convert.optimize import OptimizeRun, OptimizeSpec, check_requirements, record_reads
from snapshotter.lazy_formats import classify_layer

log = logging.getLogger(__name__)

MB = 1_000_000
MAX_CONFIG_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    format: TargetFormat = "estargz"
    platform: Platform | None = None  # None: this machine's
    chunk_size: int = DEFAULT_CHUNK_SIZE
    prioritized: tuple[str, ...] = ()  # paths in the image, put first in every layer holding them
    all_platforms: bool = False  # an index source: convert every platform, push a new index
    optimize: OptimizeSpec | None = None  # run a command once, put what it read first
    work_dir: Path | None = None  # where temporary blobs go; by default the system's temp dir


@dataclass(frozen=True, slots=True)
class LayerReport:
    number: int  # 1-based
    total: int
    source: Descriptor
    result: LayerOut
    converted: bool  # False: already in the target format, kept byte for byte
    uploaded: bool  # False: the destination repository already had the blob
    seconds: float

    def line(self, fmt: TargetFormat) -> str:
        action = f"-> {fmt}" if self.converted else f"kept ({fmt} already)"
        where = "pushed" if self.uploaded else "exists"
        return (
            f"layer {self.number}/{self.total} {self.source.digest} "
            f"{self.source.size / MB:.1f} MB {action} {self.result.digest} "
            f"{self.result.size / MB:.1f} MB {where} {self.seconds:.1f} s"
        )


@dataclass(frozen=True, slots=True)
class PlatformResult:
    """One converted image manifest; pushed by digest when part of an index."""

    platform: Platform | None  # from the source index; None for a single-manifest source
    manifest_digest: str
    manifest_size: int
    layers: tuple[LayerReport, ...]


@dataclass(frozen=True, slots=True)
class ConvertResult:
    source_digest: str  # what SRC resolved to
    destination: Reference
    digest: str  # what the destination tag now points at
    media_type: str  # OCI image manifest, or OCI index with --all-platforms on an index
    platforms: tuple[PlatformResult, ...]
    optimized: OptimizeRun | None = None  # what --optimize's command read

    @property
    def layers(self) -> tuple[LayerReport, ...]:
        return tuple(layer for result in self.platforms for layer in result.layers)


LayerCallback = Callable[[LayerReport], None]
PlatformCallback = Callable[[Platform | None], None]
StageCallback = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _SourceManifest:
    platform: Platform | None
    manifest: Manifest


async def convert_image(
    client: RegistryClient,
    source: Reference,
    destination: Reference,
    options: ConvertOptions,
    on_layer: LayerCallback | None = None,
    on_platform: PlatformCallback | None = None,
    on_stage: StageCallback | None = None,
) -> ConvertResult:
    """Convert ``source`` and push it as ``destination``; see the module doc."""
    if destination.digest is not None:
        raise ConvertError(f"{destination}: the destination must be a tag, not a digest")
    if options.optimize is not None:
        return await _convert_optimized(
            client, source, destination, options, options.optimize, on_layer, on_stage
        )
    source_digest, index, manifests = await _source_manifests(client, source, options)
    # Refuse unsupported layers before anything is downloaded or pushed.
    for entry in manifests:
        for layer in entry.manifest.layers:
            check_convertible(layer.media_type, layer.digest)
    # Per-platform manifests of an index are pushed by digest; only the tag is written last.
    untagged = Reference(destination.domain, destination.path)
    results: list[PlatformResult] = []
    for entry in manifests:
        if on_platform is not None:
            on_platform(entry.platform)
        target = destination if index is None else untagged
        results.append(
            await _convert_manifest(client, source, target, entry, options, on_layer)
        )
    if index is None:
        only = results[0]
        log.info("convert pushed destination=%s digest=%s", destination, only.manifest_digest)
        return ConvertResult(
            source_digest, destination, only.manifest_digest, OCI_MANIFEST, tuple(results)
        )
    body = build_index(
        [(r.platform, r.manifest_digest, r.manifest_size) for r in results], index.annotations
    )
    digest = await client.push_manifest(destination, body, OCI_INDEX)
    log.info("convert pushed destination=%s index=%s", destination, digest)
    return ConvertResult(source_digest, destination, digest, OCI_INDEX, tuple(results))


async def _convert_optimized(
    client: RegistryClient,
    source: Reference,
    destination: Reference,
    options: ConvertOptions,
    spec: OptimizeSpec,
    on_layer: LayerCallback | None,
    on_stage: StageCallback | None,
) -> ConvertResult:
    """Two passes: a first conversion pushed by digest only (no tag), mounted lazily to run the
    command; then the final conversion with the files it read first, pushed under the tag."""
    if options.all_platforms:
        raise ConvertError("--optimize converts one platform: drop --all-platforms")
    check_requirements()
    stage = on_stage or (lambda _text: None)
    source_digest, _index, manifests = await _source_manifests(client, source, options)
    entry = manifests[0]
    for layer in entry.manifest.layers:
        check_convertible(layer.media_type, layer.digest)
    untagged = Reference(destination.domain, destination.path)
    stage("first pass: convert to run the command")
    first = await _convert_manifest(client, source, untagged, entry, options, on_layer)
    config = await client.fetch_blob(
        source, entry.manifest.config.digest, max_size=MAX_CONFIG_BYTES
    )
    env, cwd = image_runtime(config)
    mounted = str(untagged.with_digest(first.manifest_digest))
    stage(f"running {' '.join(spec.command)!r} in {mounted} (lazily mounted)")
    run = await trio.to_thread.run_sync(record_reads, mounted, spec, env, cwd)
    outcome = "timed out" if run.exit_code is None else f"exited {run.exit_code}"
    stage(f"the command {outcome} after {run.seconds:.1f} s and read {len(run.paths)} files")
    prioritized = tuple(dict.fromkeys((*options.prioritized, *run.paths)))
    final = dataclasses.replace(options, prioritized=prioritized, optimize=None)
    stage("second pass: convert with those files first")
    result = await _convert_manifest(client, source, destination, entry, final, on_layer)
    log.info("convert pushed destination=%s digest=%s optimized_files=%d", destination,
             result.manifest_digest, len(run.paths))
    return ConvertResult(
        source_digest, destination, result.manifest_digest, OCI_MANIFEST, (result,), run
    )


async def _source_manifests(
    client: RegistryClient, source: Reference, options: ConvertOptions
) -> tuple[str, Index | None, list[_SourceManifest]]:
    """What SRC resolved to, its index when every platform is converted, and the manifests."""
    if not options.all_platforms:
        image = await client.resolve_image(source, options.platform)
        return image.digest, None, [_SourceManifest(image.platform, image.manifest)]
    top_digest = source.digest or (await client.resolve(source)).digest
    top = await client.fetch_manifest(source, top_digest)
    parsed = parse_manifest(top.content, top.media_type)
    if isinstance(parsed, Manifest):
        return top.digest, None, [_SourceManifest(None, parsed)]
    manifests: list[_SourceManifest] = []
    for entry in parsed.manifests:
        if not is_platform_image(entry.media_type, entry.platform):
            log.info("convert skip-index-entry digest=%s media_type=%s", entry.digest,
                     entry.media_type)
            continue
        content = await client.fetch_manifest(source, entry.digest)
        manifest = parse_manifest(content.content, content.media_type or entry.media_type)
        if not isinstance(manifest, Manifest):
            raise ConvertError(f"index entry {entry.digest} is not an image manifest")
        manifests.append(_SourceManifest(entry.platform, manifest))
    if not manifests:
        raise ConvertError("the index lists no image manifest for any platform")
    return top.digest, parsed, manifests


async def _convert_manifest(
    client: RegistryClient,
    source: Reference,
    destination: Reference,
    entry: _SourceManifest,
    options: ConvertOptions,
    on_layer: LayerCallback | None,
) -> PlatformResult:
    layers = entry.manifest.layers
    config = await client.fetch_blob(
        source, entry.manifest.config.digest, max_size=MAX_CONFIG_BYTES
    )
    diff_ids = source_diff_ids(config)
    if len(diff_ids) != len(layers):
        raise ConvertError(
            f"config lists {len(diff_ids)} diff IDs for a manifest of {len(layers)} layers"
        )
    work = Path(await trio.to_thread.run_sync(_make_work_dir, options.work_dir))
    try:
        converter = _LayerConverter(client, source, destination, options, work)
        reports: list[LayerReport] = []
        for number, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True), 1):
            report = await converter.convert(number, len(layers), layer, diff_id)
            reports.append(report)
            if on_layer is not None:
                on_layer(report)
    finally:
        await trio.to_thread.run_sync(shutil.rmtree, work, True)
    new_layers = [report.result for report in reports]
    new_config = rewrite_config(config, [layer.diff_id for layer in new_layers])
    config_descriptor = await client.push_blob(destination, new_config, media_type=OCI_CONFIG)
    manifest = build_manifest(
        config_descriptor.digest, config_descriptor.size, new_layers, entry.manifest.annotations
    )
    digest = await client.push_manifest(destination, manifest, OCI_MANIFEST)
    return PlatformResult(entry.platform, digest, len(manifest), tuple(reports))


def _make_work_dir(parent: Path | None) -> str:
    return tempfile.mkdtemp(prefix="lazysnap-convert-", dir=parent)


class _LayerConverter:
    """Download, convert (or keep) and push one layer at a time; temporary files are removed
    as soon as the layer is pushed, so the disk holds at most one layer's worth of them."""

    def __init__(
        self,
        client: RegistryClient,
        source: Reference,
        destination: Reference,
        options: ConvertOptions,
        work: Path,
    ) -> None:
        self._client = client
        self._source = source
        self._destination = destination
        self._options = options
        self._work = work

    async def convert(
        self, number: int, total: int, layer: Descriptor, diff_id: str
    ) -> LayerReport:
        started = time.monotonic()
        oci_type = check_convertible(layer.media_type, layer.digest)
        verdict = classify_layer(layer.media_type, layer.annotations)
        downloaded = self._work / f"layer-{number}.src"
        written = self._work / f"layer-{number}.out"
        try:
            if verdict.format == self._options.format:
                result = LayerOut(oci_type, layer.digest, layer.size, diff_id, layer.annotations)
                uploaded = await self._ensure_copied(layer, downloaded)
                converted = False
            else:
                await self._client.download_blob(self._source, layer.digest, downloaded)
                result = await self._convert_file(downloaded, written, layer)
                await trio.to_thread.run_sync(_unlink, downloaded)
                uploaded = await self._push_file(written, result.media_type, result.digest)
                converted = True
        finally:
            await trio.to_thread.run_sync(_unlink, downloaded)
            await trio.to_thread.run_sync(_unlink, written)
        return LayerReport(
            number, total, layer, result, converted, uploaded, time.monotonic() - started
        )

    async def _convert_file(self, source: Path, dest: Path, layer: Descriptor) -> LayerOut:
        fmt = self._options.format

        def work() -> LayerOut:
            try:
                written = convert_layer_file(
                    source,
                    dest,
                    fmt,
                    chunk_size=self._options.chunk_size,
                    prioritized=self._options.prioritized,
                )
            except UnreadableLayerError as exc:
                raise ConvertError(f"layer {layer.digest}: cannot convert: {exc}") from exc
            annotations = converted_annotations(layer.annotations, written.annotations)
            return LayerOut(
                TARGET_MEDIA_TYPES[fmt], written.digest, written.size, written.diff_id, annotations
            )

        # Compression is CPU-bound and zlib/zstd release the GIL: a worker thread keeps the
        # event loop responsive, and with it the registry connections it owns.
        return await trio.to_thread.run_sync(work)

    async def _has_blob(self, digest: str) -> bool:
        try:
            await self._client.stat_blob(self._destination, digest)
        except NotFoundError:
            return False
        return True

    async def _push_file(self, path: Path, media_type: str, digest: str) -> bool:
        if await self._has_blob(digest):
            return False
        await self._client.push_blob_file(self._destination, path, media_type=media_type)
        return True

    async def _ensure_copied(self, layer: Descriptor, downloaded: Path) -> bool:
        """A kept layer must exist in the destination repository too. It is copied through
        disk; the push asks the registry to mount it from the source repository first, which
        saves the upload when both live on one registry."""
        if await self._has_blob(layer.digest):
            return False
        await self._client.download_blob(self._source, layer.digest, downloaded)
        await self._client.push_blob_file(
            self._destination, downloaded, media_type=layer.media_type, mount_from=self._source
        )
        return True


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def normalize_prioritized(paths: Sequence[str]) -> tuple[str, ...]:
    """Paths as the user writes them (``/etc/hello``) to tar member names (``etc/hello``)."""
    cleaned = []
    for path in paths:
        name = path.strip().strip("/")
        if not name:
            raise ConvertError(f"--prioritize {path!r}: not a file path")
        cleaned.append(name)
    return tuple(dict.fromkeys(cleaned))
