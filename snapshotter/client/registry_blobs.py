"""Blobs of the layers that are not lazy, for ``lazysnap pull --snapshotter-address``: fetched
by a registry client that starts only when the first such blob is needed."""

from __future__ import annotations

import contextlib
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.errors import SnapshotterError

if TYPE_CHECKING:
    import trio

    from registry import CredentialProvider, Descriptor, HostsConfig, Reference, RegistryClient
    from snapshotter.client.documents import ImageDocuments
    from snapshotter.client.fetch_settings import FetchSettings
    from snapshotter.client.parallel_fetch import ParallelFetcher
    from snapshotter.client.pull import RegistryBlobs
    from snapshotter.client.spool import Spool

# How to reach the image's registry: its hosts and the credentials to use there. Called once,
# at the first blob, so that building them and importing ``registry`` cost nothing before.
ClientSetup = Callable[["Reference"], tuple["HostsConfig", "CredentialProvider"]]


class OnDemandRegistryBlobs:
    """A ``BlobSource`` whose registry client is started at the first blob that must be
    fetched, so an image whose layers are all lazy never pays for it. The client brings a trio
    loop in its own thread, a TLS context and auth. The unpack runs in the main thread and hops into
    that loop by its token.

    It is also the parallel pull's ``LayerFetcher`` when given ``parallel`` settings: the
    ranged downloads run in that loop too."""

    def __init__(
        self, image_name: str, setup: ClientSetup, parallel: FetchSettings | None = None
    ) -> None:
        self._image_name = image_name
        self._setup = setup
        self._parallel = parallel
        self._fetcher: ParallelFetcher | None = None
        self._blobs: RegistryBlobs | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._client: RegistryClient | None = None

    @contextlib.contextmanager
    def open(self, layer: Descriptor) -> Iterator[Iterable[bytes]]:
        if self._blobs is None:
            self._blobs = self._start()
        with self._blobs.open(layer) as chunks:
            yield chunks

    def start(self, layers: Sequence[Descriptor]) -> None:
        if layers:
            self._started_fetcher().start(layers)

    def spool(self, layer: Descriptor) -> Spool:
        return self._started_fetcher().spool(layer)

    def forget(self, layer: Descriptor) -> None:
        if self._fetcher is not None:
            self._fetcher.forget(layer)

    def soci_indexed(self, image: ImageDocuments) -> bool:
        """Whether ``image`` has a SOCI index (v2 by its annotation, v1 by a referrers request
        with this source's client, which an image with gzip layers to download needs anyway).
        A failed lookup is no index."""
        import trio  # noqa: PLC0415 - lazy, as the class docstring says

        from registry import parse_reference  # noqa: PLC0415
        from snapshotter.client.soci_check import has_soci_index  # noqa: PLC0415

        if self._blobs is None:
            self._blobs = self._start()
        client = self._client
        assert client is not None and self._token is not None
        ref = parse_reference(self._image_name)
        return trio.from_thread.run(has_soci_index, client, ref, image, trio_token=self._token)

    def _started_fetcher(self) -> ParallelFetcher:
        if self._blobs is None:
            self._blobs = self._start()
        if self._fetcher is None:
            raise SnapshotterError("parallel pull was not enabled for this blob source")
        return self._fetcher

    def _start(self) -> RegistryBlobs:
        import trio  # noqa: PLC0415 - lazy, as the class docstring says

        from registry import RegistryClient, parse_reference  # noqa: PLC0415
        from snapshotter.client.parallel_fetch import ParallelFetcher  # noqa: PLC0415
        from snapshotter.client.pull import RegistryBlobs  # noqa: PLC0415

        ref = parse_reference(self._image_name)
        hosts, provider = self._setup(ref)
        self._scratch = tempfile.TemporaryDirectory(prefix="lazysnap-pull-")
        scratch = Path(self._scratch.name)
        started: list[RegistryBlobs] = []
        ready = threading.Event()

        async def serve() -> None:
            async with RegistryClient(hosts, provider) as client, trio.open_nursery() as nursery:
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._client = client
                if self._parallel is not None:
                    self._fetcher = ParallelFetcher(
                        client, ref, scratch, nursery, self._token, self._parallel
                    )
                started.append(RegistryBlobs(client, ref, scratch, trio_token=self._token))
                ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        def main() -> None:
            try:
                trio.run(serve)
            except BaseException as exc:  # reported to the unpack, in the main thread
                self._failure = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=main, name="lazysnap-pull-registry", daemon=True)
        self._thread.start()
        ready.wait()
        if not started:
            raise self._failure or SnapshotterError("the registry client did not start")
        return started[0]

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
        if self._thread is not None:
            if self._token is not None and self._stop is not None:
                import trio  # noqa: PLC0415 - _start imported it already

                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()
        if self._scratch is not None:
            self._scratch.cleanup()
