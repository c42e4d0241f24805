"""Which layers the parallel pull downloads ahead: never one the daemon may serve lazily."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from registry import Descriptor
from snapshotter.client.containerd_api import ContainerdAPI
from snapshotter.client.direct_apply import DirectApplier
from snapshotter.client.spool import Spool
from snapshotter.errors import NotFoundError

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ESTARGZ_TOC = "containerd.io/snapshot/stargz/toc.digest"


class EmptyContentStore:
    def content_info(self, digest: str) -> Any:
        raise NotFoundError(digest)


class RecordingFetcher:
    def __init__(self) -> None:
        self.started: list[str] = []

    def start(self, layers: Sequence[Descriptor]) -> None:
        self.started += [layer.digest for layer in layers]

    def spool(self, layer: Descriptor) -> Spool:
        raise AssertionError("not used here")

    def forget(self, layer: Descriptor) -> None:
        pass


def _layer(n: int, media_type: str = GZIP, **annotations: str) -> Descriptor:
    return Descriptor(media_type, f"sha256:{n:064x}", 1000 * n, annotations)


LAYERS = [
    _layer(1),
    _layer(2, ZSTD),
    _layer(3, **{ESTARGZ_TOC: "sha256:" + "e" * 64}),
    _layer(4),
]


def _started(*, soci_indexed: bool) -> list[str]:
    fetcher = RecordingFetcher()
    applier = DirectApplier(cast(ContainerdAPI, EmptyContentStore()), fetcher,
                            soci_indexed=soci_indexed)
    chosen = applier.prefetch(LAYERS)
    assert [layer.digest for layer in chosen] == fetcher.started
    return fetcher.started


def test_plain_gzip_layers_are_downloaded_ahead_when_nothing_indexes_them() -> None:
    # Not the zstd layer (containerd applies it) nor the eStargz one (lazy).
    assert _started(soci_indexed=False) == [LAYERS[0].digest, LAYERS[3].digest]


def test_no_gzip_layer_is_downloaded_ahead_of_an_image_with_a_soci_index() -> None:
    # Any of them may be served lazily through the index; only its Prepare will tell.
    assert _started(soci_indexed=True) == []


class Lookup:
    """A v1 index lookup: counts how often it is asked."""

    def __init__(self, found: bool) -> None:
        self.found = found
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.found


def test_a_v1_lookup_that_finds_an_index_keeps_every_gzip_layer_back_and_is_asked_once() -> None:
    lookup = Lookup(found=True)
    fetcher = RecordingFetcher()
    applier = DirectApplier(cast(ContainerdAPI, EmptyContentStore()), fetcher,
                            soci_indexed=lookup)
    assert applier.prefetch(LAYERS) == []
    assert applier.prefetch(LAYERS[:1]) == []
    assert (fetcher.started, lookup.asked) == ([], 1)


def test_a_v1_lookup_that_finds_nothing_downloads_the_gzip_layers_ahead() -> None:
    lookup = Lookup(found=False)
    fetcher = RecordingFetcher()
    DirectApplier(cast(ContainerdAPI, EmptyContentStore()), fetcher,
                  soci_indexed=lookup).prefetch(LAYERS)
    assert fetcher.started == [LAYERS[0].digest, LAYERS[3].digest]


def test_no_lookup_is_made_when_no_gzip_layer_would_be_downloaded() -> None:
    lookup = Lookup(found=True)
    fetcher = RecordingFetcher()
    DirectApplier(cast(ContainerdAPI, EmptyContentStore()), fetcher,
                  soci_indexed=lookup).prefetch([LAYERS[1], LAYERS[2]])
    assert lookup.asked == 0
