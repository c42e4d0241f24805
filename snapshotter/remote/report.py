"""What ``lazysnap status --layers`` shows of one attached layer (``Daemon/Layers``), also of
one whose index is being built or failed to build (``fusefs.pending``)."""

from __future__ import annotations

from dataclasses import dataclass

from fusefs import LayerUsage

VERIFIED = "verified"  # the whole blob, or every chunk with digests that prove it, checked
FAILED = "failed"  # the blob digest did not match, or background fetch could not finish
PENDING = "pending"  # background fetch still running; each chunk read is checked
CHUNKS_ONLY = "chunks-only"  # no background fetch: each chunk read is checked, the blob never
INDEXING = "indexing"  # answered once its TOC matched its digest; its index is being built
INDEX_FAILED = "index-failed"  # its TOC matched its digest but could not be indexed: all EIO


@dataclass(frozen=True, slots=True)
class LayerReport:
    layer_id: str
    image: str
    digest: str
    format: str
    size: int  # compressed blob size
    fetched_bytes: int  # compressed bytes read from the registry
    cached_bytes: int  # uncompressed bytes of its chunks in the cache
    on_demand_bytes: int
    prefetch_bytes: int
    background_bytes: int
    verification: str
    chunk_verify_failures: int
    errors: int
    last_error: str
    registry_bytes: int  # fetched_bytes plus its footer and TOC reads, when the blob counts them


@dataclass(frozen=True, slots=True)
class LayersReport:
    layers: list[LayerReport]
    cache_bytes: int
    cache_capacity_bytes: int


def layer_report(usage: LayerUsage, image: str, fmt: str, background_fetch: bool,
                 registry_bytes: int | None) -> LayerReport:
    by_kind = usage.fetched_by_kind or {}
    if usage.blob_verified is True:
        verification = VERIFIED
    elif usage.blob_verified is False:
        verification = FAILED
    elif background_fetch:
        verification = PENDING
    else:
        verification = CHUNKS_ONLY
    return LayerReport(
        layer_id=usage.layer_id,
        image=image,
        digest=usage.digest,
        format=fmt,
        size=usage.blob_size,
        fetched_bytes=usage.fetched_bytes,
        cached_bytes=usage.cached_bytes,
        on_demand_bytes=by_kind.get("on_demand", 0),
        prefetch_bytes=by_kind.get("prefetch", 0),
        background_bytes=by_kind.get("background", 0),
        verification=verification,
        chunk_verify_failures=usage.verify_failures,
        errors=usage.errors,
        last_error=usage.last_error or "",
        registry_bytes=usage.fetched_bytes if registry_bytes is None else registry_bytes,
    )


def building_report(layer_id: str, digest: str, failure: str | None, image: str, fmt: str,
                    size: int) -> LayerReport:
    """A layer whose index is being built, or failed to build (``failure``)."""
    return LayerReport(
        layer_id=layer_id,
        image=image,
        digest=digest,
        format=fmt,
        size=size,
        fetched_bytes=0,
        cached_bytes=0,
        on_demand_bytes=0,
        prefetch_bytes=0,
        background_bytes=0,
        verification=INDEXING if failure is None else INDEX_FAILED,
        chunk_verify_failures=0,
        errors=0 if failure is None else 1,
        last_error=failure or "",
        registry_bytes=0,
    )
