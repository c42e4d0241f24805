"""Parallel pull: layers downloaded in ranges and unpacked straight into their snapshots.

For a layer that must be applied, containerd's way is to store the whole blob, then let its
diff service read it back, inflate and unpack it. Here the blob comes from a ``ParallelFetcher``
spool and is read twice while it arrives: once into containerd's content store (so that
``ctr images check`` and later unpacks find it, as after any pull), once inflated and unpacked
into the active snapshot's directory. Both digests are checked before the snapshot is
committed; on a mismatch the caller removes the snapshot and containerd refuses the content.

The direct path declines (``apply`` returns None) where it cannot do what containerd does:
a mount that is not one writable directory or overlay upper directory, a compression it does
not read, a blob containerd already has. The caller then asks containerd's diff service.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from registry import Descriptor
from snapshotter.client.containerd_api import ContainerdAPI, ingest_ref
from snapshotter.client.layer_reader import LayerReader
from snapshotter.client.progress import NoProgress, Progress
from snapshotter.client.spool import Spool, SpoolError
from snapshotter.client.tar_apply import UnsupportedEntryError, apply_tar
from snapshotter.errors import NotFoundError
from snapshotter.lazy_formats import classify_layer, layer_compression
from snapshotter.model import Mount

log = logging.getLogger(__name__)


class LayerFetcher(Protocol):
    """``ParallelFetcher`` as the direct path uses it."""

    def start(self, layers: Sequence[Descriptor]) -> None: ...

    def spool(self, layer: Descriptor) -> Spool: ...

    def forget(self, layer: Descriptor) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    root: Path  # the directory the layer's tar is applied to
    overlay: bool  # an overlay upper directory: whiteouts become overlayfs whiteouts
    lowers: tuple[Path, ...]  # nearest first


def _option(options: Sequence[str], name: str) -> str | None:
    prefix = name + "="
    return next((o[len(prefix):] for o in options if o.startswith(prefix)), None)


def writable_target(mounts: Sequence[Mount]) -> Target | None:
    """The directory of an active snapshot's mounts, as containerd's applier finds it: a
    read-write bind mount's source, or an overlay's ``upperdir``. None for anything else."""
    if len(mounts) != 1:
        return None
    mount = mounts[0]
    if mount.type == "bind" and "ro" not in mount.options:
        root = Path(mount.source)
        return Target(root, False, ()) if root.is_dir() else None
    if mount.type == "overlay":
        upper = _option(mount.options, "upperdir")
        lowers = _option(mount.options, "lowerdir")
        if upper is None or not Path(upper).is_dir():
            return None
        return Target(Path(upper), True, tuple(Path(p) for p in (lowers or "").split(":") if p))
    return None


def _compression(layer: Descriptor) -> str | None:
    compression = layer_compression(layer.media_type)
    return compression if compression in {"gzip", "none"} else None


class _ContentWriter:
    """Writes the spool into containerd's content store on a thread of its own."""

    def __init__(self, api: ContainerdAPI, layer: Descriptor, chunks: Iterable[bytes]) -> None:
        self._api = api
        self._layer = layer
        self._chunks = chunks
        self._ref = ingest_ref(layer.digest)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="content-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._api.write_content(
                self._ref, self._chunks, expected=self._layer.digest, total=self._layer.size
            )
        except BaseException as exc:  # reported by ``join`` in the unpacker's thread
            self.error = exc

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


class DirectApplier:
    def __init__(
        self, api: ContainerdAPI, fetcher: LayerFetcher, progress: Progress | None = None,
        *, soci_indexed: bool | Callable[[], bool] = False,
    ) -> None:
        """``soci_indexed``: the image has a SOCI index, so the daemon may serve its gzip layers
        lazily. They are then not downloaded ahead: a layer turns out lazy only when its
        Prepare answers, and by then a download ahead would have fetched all of it. A callable
        (a registry lookup) is asked at most once, and only when a gzip layer would be."""
        self._api = api
        self._fetcher = fetcher
        self._progress = progress or NoProgress()
        self._soci_indexed = soci_indexed

    def _in_content_store(self, layer: Descriptor) -> bool:
        try:
            self._api.content_info(layer.digest)
        except NotFoundError:
            return False
        return True

    def prefetch(self, layers: Sequence[Descriptor]) -> list[Descriptor]:
        """Start downloading, in this order, the ``layers`` that the direct path will apply:
        not lazy, of a compression it reads, not in the content store. Returns them."""
        chosen = [
            layer for layer in layers
            if not classify_layer(layer.media_type, layer.annotations).lazy
            and _compression(layer) is not None
            and not self._in_content_store(layer)
        ]
        if any(_compression(layer) == "gzip" for layer in chosen) and self._has_soci_index():
            chosen = [layer for layer in chosen if _compression(layer) != "gzip"]
        if chosen:
            log.info("pull parallel-prefetch layers=%d bytes=%d",
                     len(chosen), sum(layer.size for layer in chosen))
            self._fetcher.start(chosen)
        return chosen

    def _has_soci_index(self) -> bool:
        if callable(self._soci_indexed):
            self._soci_indexed = self._soci_indexed()
        return self._soci_indexed

    def apply(self, layer: Descriptor, diff_id: str, mounts: Sequence[Mount]) -> int | None:
        """Bytes fetched, once the layer is unpacked into ``mounts`` and verified; None when
        containerd must apply it. ``UnsupportedEntryError``: the blob is now in the content
        store, containerd must apply it to a fresh snapshot."""
        compression = _compression(layer)
        target = writable_target(mounts)
        if compression is None or target is None or self._in_content_store(layer):
            return None
        spool = self._fetcher.spool(layer)
        started = time.monotonic()
        try:
            writer = _ContentWriter(self._api, layer, spool.chunks())
            reader = LayerReader(
                self._counted(spool.chunks()), digest=layer.digest, diff_id=diff_id,
                gzip=compression == "gzip",
            )
            try:
                entries = apply_tar(
                    reader, target.root, overlay=target.overlay, lowers=target.lowers
                )
                reader.finish()
                unpacked = time.monotonic()
            except UnsupportedEntryError:
                writer.join()  # containerd applies it from the content store
                raise
            except BaseException as exc:
                spool.fail(SpoolError(f"unpack failed: {exc}"))  # stops the content write
                with contextlib.suppress(BaseException):  # the unpack's error is the one to report
                    writer.join()
                raise
            writer.join()
        finally:
            self._fetcher.forget(layer)
        log.info(
            "pull direct-applied digest=%s entries=%d tar_bytes=%d unpack_s=%.2f "
            "content_wait_s=%.2f", layer.digest, entries, reader.tar_bytes, unpacked - started,
            time.monotonic() - unpacked,
        )
        return layer.size

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._progress.layer_bytes(len(chunk))
            yield chunk
