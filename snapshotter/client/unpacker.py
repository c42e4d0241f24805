"""Unpack an image's layers into a snapshotter the way containerd's unpacker does, with the
per-layer labels containerd's CRI adds, so that a lazy snapshotter can serve them remotely.

Per layer, bottom first, with the semantics of containerd 1.6's ``unpacker.go``:

1. ``Stat(chainID)`` finds the layer: nothing to do. The outcome is ``exists``.
2. A Prepare with the key ``extract-<nanos>-<rand> <chainID>``, the previous chain ID as
   parent, and the labels. A snapshotter that can serve the layer itself commits it under the
   chain ID and answers ALREADY_EXISTS; then ``Stat(chainID)`` confirms it and the layer is
   done. The outcome is ``remote``.
3. Otherwise the answer is an ordinary active snapshot: make sure the blob is in containerd's
   content store, let containerd's diff service apply it onto the mounts, check the applied
   digest against the config's diff ID, and commit the key under the chain ID with the labels.
   The outcome is ``applied``.

The caller holds a containerd lease around ``unpack`` so that nothing is collected half-way.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from registry import Descriptor, Manifest
from snapshotter import labels as L
from snapshotter.client.chain import chain_ids, diff_ids_from_config, layer_labels
from snapshotter.client.containerd_api import ContainerdAPI, ingest_ref
from snapshotter.client.progress import LayerResult, NoProgress, Outcome, Progress
from snapshotter.client.tar_apply import UnsupportedEntryError
from snapshotter.errors import AlreadyExistsError, NotFoundError, SnapshotterError
from snapshotter.model import Mount
from snapshotter.soci_index import IMAGE_INDEX_DIGEST

if TYPE_CHECKING:
    from snapshotter.client.direct_apply import DirectApplier

log = logging.getLogger(__name__)

PREPARE_ATTEMPTS = 3  # containerd retries a Prepare whose ALREADY_EXISTS target then vanished


class UnpackError(SnapshotterError):
    """The image cannot be unpacked: it is inconsistent, a digest mismatches or a blob is
    missing."""


class MissingBlobError(UnpackError):
    """A layer that must be applied is not in containerd's content store and cannot be fetched."""


@dataclass(frozen=True, slots=True)
class LayerPlan:
    number: int  # 1-based, bottom layer first
    descriptor: Descriptor
    diff_id: str
    chain_id: str
    parent: str  # the previous layer's chain ID, "" for the bottom layer
    labels: Mapping[str, str]  # for the extraction Prepare and the Commit


@dataclass(frozen=True, slots=True)
class UnpackPlan:
    image_ref: str
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerPlan, ...]

    @property
    def top_chain_id(self) -> str:
        return self.layers[-1].chain_id if self.layers else ""


def plan_unpack(
    image_ref: str, manifest_digest: str, manifest: Manifest, config: bytes
) -> UnpackPlan:
    """Chain IDs, parents and labels of every layer (pure)."""
    diff_ids = diff_ids_from_config(config)
    if len(diff_ids) != len(manifest.layers):
        raise UnpackError(
            f"manifest {manifest_digest} has {len(manifest.layers)} layers but its config "
            f"lists {len(diff_ids)} diff IDs"
        )
    chains = chain_ids(diff_ids)
    digests = [layer.digest for layer in manifest.layers]
    # The SOCI v2 index the manifest names goes with each layer, so the daemon finds it
    # without fetching the manifest, and knows there is none when it is absent.
    soci = {k: v for k, v in manifest.annotations.items() if k == IMAGE_INDEX_DIGEST}
    layers = tuple(
        LayerPlan(
            number=i + 1,
            descriptor=layer,
            diff_id=diff_ids[i],
            chain_id=chains[i],
            parent=chains[i - 1] if i else "",
            labels=layer_labels(
                image_ref=image_ref,
                manifest_digest=manifest_digest,
                layer_digests=digests,
                index=i,
                chain_id=chains[i],
                annotations={**layer.annotations, **soci},
                media_type=layer.media_type,
            ),
        )
        for i, layer in enumerate(manifest.layers)
    )
    return UnpackPlan(image_ref, manifest_digest, manifest.config.digest, layers)


class BlobSource(Protocol):
    """Where a layer blob comes from when containerd's content store lacks it."""

    def open(self, layer: Descriptor) -> AbstractContextManager[Iterable[bytes]]: ...


def extraction_key(chain_id: str) -> str:
    """containerd's key shape for an extraction snapshot: unique, and naming its target."""
    unique = base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{unique} {chain_id}"


class Unpacker:
    def __init__(
        self,
        api: ContainerdAPI,
        snapshotter: str,
        *,
        blobs: BlobSource | None = None,
        progress: Progress | None = None,
        direct: DirectApplier | None = None,
        new_key: Callable[[str], str] = extraction_key,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._snapshotter = snapshotter
        self._blobs = blobs
        self._progress = progress or NoProgress()
        self._direct = direct
        self._new_key = new_key
        self._clock = clock

    def unpack(self, plan: UnpackPlan) -> list[LayerResult]:
        existing: set[str] | None = None
        if self._direct is not None:
            # Every layer to apply downloads from now on; they are applied in chain order. The
            # layers found here are not asked about again: each Stat is a round trip through
            # containerd to the snapshotter, and unpacking a layer creates no later chain.
            existing = {layer.chain_id for layer in plan.layers if self._exists(layer.chain_id)}
            self._direct.prefetch(
                [layer.descriptor for layer in plan.layers if layer.chain_id not in existing]
            )
        results = [self._unpack_layer(plan, layer, existing) for layer in plan.layers]
        if plan.layers:
            # What keeps the snapshots alive once the lease is gone: image -> (index ->)
            # manifest -> config -> top snapshot -> its parents.
            self._api.set_content_labels(
                plan.config_digest,
                {L.GC_REF_SNAPSHOT_PREFIX + self._snapshotter: plan.top_chain_id},
            )
        return results

    def _unpack_layer(
        self, plan: UnpackPlan, layer: LayerPlan, existing: set[str] | None
    ) -> LayerResult:
        """``existing``: the chains a Stat found at the start, or None to Stat this one now."""
        total = len(plan.layers)
        digest = layer.descriptor.digest
        started = self._clock()
        self._progress.layer_started(layer.number, total, digest, layer.descriptor.size)

        def finish(outcome: Outcome, size: int = 0) -> LayerResult:
            result = LayerResult(
                layer.number, total, digest, layer.chain_id, outcome, size,
                self._clock() - started,
            )
            log.info(
                "unpack layer=%d/%d digest=%s chain_id=%s outcome=%s snapshotter=%s",
                layer.number, total, digest, layer.chain_id, outcome, self._snapshotter,
            )
            self._progress.layer_finished(result)
            return result

        found = self._exists(layer.chain_id) if existing is None else layer.chain_id in existing
        if found:
            return finish("exists")
        for _attempt in range(PREPARE_ATTEMPTS):
            key = self._new_key(layer.chain_id)
            try:
                mounts = self._api.prepare_snapshot(
                    self._snapshotter, key, layer.parent, layer.labels
                )
            except AlreadyExistsError:
                # The snapshotter took the layer (remote snapshot) - or another unpack did.
                if self._exists(layer.chain_id):
                    return finish("remote")
                log.warning("unpack prepare-exists-but-stat-missing chain_id=%s", layer.chain_id)
                continue
            written = self._apply(layer, key, mounts)
            if written is None:
                written = self._apply_in_fresh_snapshot(layer)
            return finish("applied", written)
        raise UnpackError(
            f"layer {digest}: {self._snapshotter} reported chain {layer.chain_id} as existing "
            f"{PREPARE_ATTEMPTS} times, but it cannot be found"
        )

    def _exists(self, chain_id: str) -> bool:
        try:
            self._api.stat_snapshot(self._snapshotter, chain_id)
        except NotFoundError:
            return False
        return True

    def _apply_in_fresh_snapshot(self, layer: LayerPlan) -> int:
        """containerd applies the layer, after the direct path gave up half-way through it."""
        key = self._new_key(layer.chain_id)
        mounts = self._api.prepare_snapshot(self._snapshotter, key, layer.parent, layer.labels)
        written = self._apply(layer, key, mounts, direct=False)
        assert written is not None  # only the direct path gives up
        return written

    def _apply(
        self, layer: LayerPlan, key: str, mounts: Sequence[Mount], *, direct: bool = True
    ) -> int | None:
        """Bytes fetched; None when the direct path gave up and removed ``key``."""
        try:
            written: int | None = None
            if direct and self._direct is not None:
                try:
                    written = self._direct.apply(layer.descriptor, layer.diff_id, mounts)
                except UnsupportedEntryError as exc:
                    log.info("unpack direct-unsupported digest=%s reason=%s fallback=containerd",
                             layer.descriptor.digest, exc)
                    self._remove_quietly(key)
                    return None
            if written is None:
                written = self._ensure_blob(layer.descriptor)
                applied = self._api.apply_diff(layer.descriptor, mounts)
                if applied.digest != layer.diff_id:
                    raise UnpackError(
                        f"layer {layer.descriptor.digest} unpacks to {applied.digest}, but the "
                        f"image config says {layer.diff_id}"
                    )
            try:
                self._api.commit_snapshot(self._snapshotter, layer.chain_id, key, layer.labels)
            except AlreadyExistsError:
                # Someone committed the same chain meanwhile: theirs is as good as ours.
                self._remove_quietly(key)
        except BaseException:
            self._remove_quietly(key)
            raise
        self._api.set_content_labels(layer.descriptor.digest, {L.UNCOMPRESSED: layer.diff_id})
        return written

    def _remove_quietly(self, key: str) -> None:
        with contextlib.suppress(SnapshotterError):
            self._api.remove_snapshot(self._snapshotter, key)

    def _ensure_blob(self, layer: Descriptor) -> int:
        """Bytes written into the content store; 0 when it already had the blob."""
        try:
            info = self._api.content_info(layer.digest)
        except NotFoundError:
            pass
        else:
            if info.size == layer.size:
                return 0
            raise UnpackError(
                f"layer {layer.digest} is {info.size} bytes in containerd's content store, "
                f"the manifest says {layer.size}"
            )
        if self._blobs is None:
            raise MissingBlobError(
                f"layer {layer.digest} is not in containerd's content store "
                "(pull the image again, e.g. with `lazysnap pull`)"
            )
        with self._blobs.open(layer) as chunks:
            self._api.write_content(
                ingest_ref(layer.digest),
                chunks,
                expected=layer.digest,
                total=layer.size,
                on_progress=self._progress.layer_bytes,
            )
        return layer.size
