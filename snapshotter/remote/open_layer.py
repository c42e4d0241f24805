"""Open a lazy layer: its blob and its index, read with the digests its annotations vouch for.

The one place where a layer's footer and TOC are read. Attach, restore after a restart, TOC
read-ahead and ``lazysnap mount`` all come here, so they check the same digests the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import trio

from fusefs import (
    BlobReader,
    IndexReadBlob,
    LayerFormatError,
    LayerIndex,
    VerifiedToc,
    build_index_off_loop,
    fetch_verified_toc,
    parse_ztoc,
)
from registry import Reference, RegistryClient
from snapshotter.labels import ESTARGZ_TOC_DIGEST
from snapshotter.remote.saved_toc import RecordingBlob, SavedTocBlob
from snapshotter.soci_index import ZtocDescriptor


@dataclass(frozen=True, slots=True)
class OpenedLayer:
    blob: BlobReader
    # What to save for restarts: the footer and TOC ranges read from the blob, or, for a plain
    # gzip layer, the zTOC as range 0 of the blob ``saved_digest`` names.
    ranges: dict[int, bytes]
    index: LayerIndex
    saved_digest: str | None = None  # the blob ``ranges`` belong to, when not ``blob``


@dataclass(frozen=True, slots=True)
class CheckedToc:
    """A layer whose TOC is fetched and matches its digests, not yet indexed: what a lazy
    Prepare answers with. ``build_index_off_loop(toc)`` indexes it."""

    blob: BlobReader
    ranges: dict[int, bytes]  # the footer and TOC ranges read, to save for restarts
    toc: VerifiedToc


async def open_ztoc_layer(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    ztoc: ZtocDescriptor,
    *,
    size: int | None = None,
) -> OpenedLayer:
    """Open a plain gzip blob and the zTOC its SOCI index lists for it, fetched by the digest
    the index gives and refused unless it hashes to it."""
    blob = await client.open_blob(ref, digest, size)
    data = await client.fetch_blob(ref, ztoc.digest, size=ztoc.size)
    return await index_ztoc_layer(blob, data, ztoc.digest)


async def index_ztoc_layer(blob: BlobReader, data: bytes, ztoc_digest: str) -> OpenedLayer:
    """Index a gzip blob from its zTOC ``data``, which must hash to ``ztoc_digest``."""
    index = await trio.to_thread.run_sync(
        lambda: parse_ztoc(data, blob_size=blob.size, ztoc_digest=ztoc_digest)
    )
    if index.span_digests is None:
        # Spans are then checked by length only, and a wrong window would inflate to wrong
        # bytes of the right length: such a layer is not served before its blob is verified.
        raise LayerFormatError(f"zTOC {ztoc_digest} has no span digests")
    return OpenedLayer(blob, {0: data}, index, saved_digest=ztoc_digest)


def expected_toc_digest(annotations: Mapping[str, str] | None) -> str | None:
    """The eStargz TOC digest a layer's annotations vouch for. zstd:chunked carries its
    checksums in other annotations, which the index loader reads itself."""
    return None if annotations is None else annotations.get(ESTARGZ_TOC_DIGEST)


async def open_layer(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    annotations: Mapping[str, str] | None,
    *,
    size: int | None = None,
) -> OpenedLayer:
    """Open the blob in the registry and index it. Without ``size`` the registry is asked."""
    checked = await open_layer_toc(client, ref, digest, annotations, size=size)
    return OpenedLayer(checked.blob, checked.ranges, await build_index_off_loop(checked.toc))


async def open_layer_toc(
    client: RegistryClient,
    ref: Reference,
    digest: str,
    annotations: Mapping[str, str] | None,
    *,
    size: int | None = None,
) -> CheckedToc:
    """Open the blob in the registry, fetch its TOC and check it; no index yet."""
    blob = await client.open_blob(ref, digest, size)
    return await check_layer_toc(blob, annotations)


async def index_layer(
    blob: BlobReader,
    annotations: Mapping[str, str] | None,
    *,
    saved: dict[int, bytes] | None = None,
    toc_digest: str | None = None,
) -> OpenedLayer:
    """Read the index of an open blob (``check_layer_toc``, then the index built)."""
    checked = await check_layer_toc(blob, annotations, saved=saved, toc_digest=toc_digest)
    return OpenedLayer(blob, checked.ranges, await build_index_off_loop(checked.toc))


async def check_layer_toc(
    blob: BlobReader,
    annotations: Mapping[str, str] | None,
    *,
    saved: dict[int, bytes] | None = None,
    toc_digest: str | None = None,
) -> CheckedToc:
    """Fetch the TOC of an open blob and check its digests. ``saved``: footer and TOC ranges
    read before, served without the network. ``toc_digest``: the digest recorded at first
    attach, instead of the annotations', because a restart trusts what it verified then."""
    traced = IndexReadBlob(blob)  # recorded as kind index while someone traces
    source = traced if saved is None else SavedTocBlob(traced, saved)
    recording = RecordingBlob(source)
    if saved is not None:
        recording.ranges.update(saved)
    toc = await fetch_verified_toc(
        recording,
        toc_digest=toc_digest if toc_digest is not None else expected_toc_digest(annotations),
        annotations=None if annotations is None else dict(annotations),
    )
    return CheckedToc(blob, recording.ranges, toc)
