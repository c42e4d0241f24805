"""The gRPC threads' way into the trio side: one ``trio.from_thread`` hop per call.

``TrioBridge`` is the store's ``RemoteLayers`` and the daemon service's way to resolve images
and read TOCs ahead. It is also the edge where the trio side's unexpected failures stop: a
Prepare falls back to an ordinary snapshot, and best-effort work only logs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import ParamSpec, TypeVar

import trio

from registry import CredentialProvider, Reference
from snapshotter.client.documents import ImageDocuments
from snapshotter.errors import NotImplementedByBackendError
from snapshotter.remote.layers import LazyLayers
from snapshotter.remote.report import LayersReport
from snapshotter.store.remote import AttachedLayer, RemoteLayerError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class LazyPullingStoppedError(NotImplementedByBackendError):
    """The daemon is stopping: its trio side no longer runs."""


class TrioBridge:
    """Implements ``snapshotter.store.remote.RemoteLayers`` over ``LazyLayers``."""

    def __init__(self, layers: LazyLayers, token: trio.lowlevel.TrioToken) -> None:
        self._layers = layers
        self._token = token

    def _hop(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        async def call() -> T:
            return await fn(*args, **kwargs)

        try:
            return trio.from_thread.run(call, trio_token=self._token)
        except trio.RunFinishedError:
            raise LazyPullingStoppedError("lazy pulling has stopped in this daemon") from None

    # -- the store's RemoteLayers -----------------------------------------------------------

    def mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        try:
            return self._hop(self._layers.mount, labels, layer_id)
        except RemoteLayerError:
            raise
        except Exception as exc:  # a bug or an unmapped error must not fail the Prepare
            log.exception("remote mount failed layer=%s", layer_id)
            raise RemoteLayerError(f"{type(exc).__name__}: {exc}") from exc

    def unmount(self, layer_id: str) -> None:
        try:
            self._hop(self._layers.unmount, layer_id)
        except Exception:  # the row is gone already; a layer left attached is only memory
            log.exception("remote unmount failed layer=%s", layer_id)

    def reports(self) -> LayersReport:
        return self._hop(self._layers.reports)

    def cached_bytes(self, layer_id: str) -> int:
        return self._hop(self._layers.cached_bytes, layer_id)

    def collect_garbage(self, recorded: Mapping[str, str], attaching: Collection[str]) -> None:
        try:
            self._hop(self._layers.collect_garbage, recorded, attaching)
        except Exception:  # the cache is only disk space: Cleanup itself succeeded
            log.exception("cache garbage collection failed")

    # -- the daemon service ----------------------------------------------------------------

    def resolve(self, image: str, platform: str) -> ImageDocuments:
        return self._hop(self._layers.resolve, image, platform)

    def check_access(
        self, credentials: CredentialProvider, registry: str, ref: Reference | None
    ) -> None:
        """Raise a domain error unless the registry accepts ``credentials`` for ``ref``."""
        self._hop(self._layers.check_access, credentials, registry, ref)

    def read_ahead(self, layers: Sequence[tuple[Mapping[str, str], int | None]]) -> list[bool]:
        """Start the TOC reads of announced layers, all in one hop; which ones started."""

        async def start() -> list[bool]:
            return self._layers.read_ahead(layers)

        return self._hop(start)
