"""The gRPC threads cross into trio once per lazy Prepare and twice per Resolve, whatever the
number of layers; a Resolve asks the store about all layers in one transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.client.chain import layer_labels
from snapshotter.errors import AlreadyExistsError, InvalidArgumentError
from snapshotter.labels import ESTARGZ_TOC_DIGEST, REMOTE
from snapshotter.remote.bridge import TrioBridge
from snapshotter.remote.prepare_ahead import (
    MAX_ANNOUNCED_LAYERS,
    read_ahead_announced,
    resolve_and_read_ahead,
)
from snapshotter.store import metadata
from snapshotter.store.remote import AttachedLayer, RemoteLayerError
from snapshotter.store.snapshots import Snapshotter
from tests.snapshotter.remote.test_resolve import _digest, _documents

IMAGE = "reg.example:5000/app:1"
TOC = {ESTARGZ_TOC_DIGEST: "sha256:" + "7" * 64}


def _labels(chain: str, digest: str, annotations: Mapping[str, str]) -> dict[str, str]:
    return layer_labels(
        image_ref=IMAGE, manifest_digest="sha256:" + "m" * 64, layer_digests=[digest],
        index=0, chain_id=chain, annotations=annotations,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
    )  # fmt: skip


class FakeLazyLayers:
    """The trio side, recording what reaches it."""

    def __init__(self, documents: Any = None) -> None:
        self.mounted: list[str] = []
        self.unmounted: list[str] = []
        self.announced: list[tuple[Mapping[str, str], int | None]] = []
        self.documents = documents
        self.fail_with: BaseException | None = None

    async def mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        trio.lowlevel.current_task()  # only callable on the trio thread
        if self.fail_with is not None:
            raise self.fail_with
        self.mounted.append(layer_id)
        return AttachedLayer(layer_id, 7, IMAGE, labels["containerd.io/snapshot/cri.layer-digest"],
                             1234, TOC[ESTARGZ_TOC_DIGEST], dict(TOC), "estargz")

    async def unmount(self, layer_id: str) -> None:
        self.unmounted.append(layer_id)

    async def resolve(self, image: str, platform: str) -> Any:
        return self.documents

    def read_ahead(self, layers: Sequence[tuple[Mapping[str, str], int | None]]) -> list[bool]:
        self.announced.extend(layers)
        return [ESTARGZ_TOC_DIGEST in labels for labels, _ in layers]


@contextmanager
def running_bridge(layers: FakeLazyLayers) -> Iterator[TrioBridge]:
    """A trio loop on another thread, as in the daemon, and a bridge into it."""
    ready = threading.Event()
    stop: list[Callable[[], None]] = []
    bridges: list[TrioBridge] = []

    async def main() -> None:
        done = trio.Event()
        bridges.append(TrioBridge(layers, trio.lowlevel.current_trio_token()))  # type: ignore[arg-type]
        stop.append(done.set)
        ready.set()
        await done.wait()

    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    try:
        assert ready.wait(10)
        yield bridges[0]
    finally:
        trio.from_thread.run_sync(stop[0], trio_token=bridges[0]._token)
        thread.join(10)


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    crossings: list[str] = []
    real = trio.from_thread.run

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        crossings.append(getattr(fn, "__qualname__", repr(fn)))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.from_thread, "run", counting)
    return crossings


@pytest.fixture
def transactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    opened: list[int] = []
    real = metadata.MetadataStore.transaction

    def counting(self: metadata.MetadataStore) -> Any:
        opened.append(1)
        return real(self)

    monkeypatch.setattr(metadata.MetadataStore, "transaction", counting)
    return opened


def test_a_lazy_prepare_crosses_into_trio_once(tmp_path: Path, hops: list[str]) -> None:
    layers = FakeLazyLayers()
    sn = Snapshotter(tmp_path / "root")
    try:
        with running_bridge(layers) as bridge:
            sn.enable_remote(bridge)
            chain = "sha256:" + "1" * 64
            with pytest.raises(AlreadyExistsError):
                sn.prepare("extract-1", "", _labels(chain, "sha256:" + "a" * 64, TOC))
            assert len(hops) == 1
            assert sn.stat(chain).labels[REMOTE] == "remote snapshot"
            assert len(layers.mounted) == 1
            # A container's own snapshot on top never reaches the trio side.
            sn.prepare("container", chain, {})
            assert len(hops) == 1
    finally:
        sn.close()


def test_a_prepare_that_falls_back_crosses_once_and_unexpected_errors_stop_at_the_bridge(
    tmp_path: Path, hops: list[str]
) -> None:
    layers = FakeLazyLayers()
    sn = Snapshotter(tmp_path / "root")
    try:
        with running_bridge(layers) as bridge:
            sn.enable_remote(bridge)
            for i, failure in enumerate([RemoteLayerError("not lazy"), KeyError("bug")]):
                layers.fail_with = failure
                hops.clear()
                mounts = sn.prepare(f"extract-{i}", "",
                                    _labels(f"sha256:{i}" + "0" * 63, "sha256:" + "b" * 64, TOC))
                assert len(hops) == 1
                assert mounts and mounts[0].type == "bind"  # the ordinary path served it
    finally:
        sn.close()


def test_resolve_of_n_layers_is_two_hops_and_one_transaction(
    tmp_path: Path, hops: list[str], transactions: list[int]
) -> None:
    documents = _documents(with_index=False)
    layers = FakeLazyLayers(documents)
    sn = Snapshotter(tmp_path / "root")
    try:
        with running_bridge(layers) as bridge:
            transactions.clear()
            resolved = resolve_and_read_ahead(bridge, sn.existing, IMAGE, "")
    finally:
        sn.close()
    assert len(hops) == 2
    assert len(transactions) == 1
    assert resolved.read_ahead == (documents.manifest.layers[0].digest,)
    assert resolved.manifest_digest == _digest(documents.manifest_content)


def test_announced_layers_are_read_ahead_in_one_hop_unless_they_exist(
    tmp_path: Path, hops: list[str], transactions: list[int]
) -> None:
    layers = FakeLazyLayers()
    sn = Snapshotter(tmp_path / "root")
    try:
        existing = "sha256:" + "e" * 64
        sn.prepare("extract", "", {})
        sn.commit(existing, "extract", {})
        announced = [
            (_labels("sha256:" + f"{i:064x}", "sha256:" + f"{i + 100:064x}", TOC), 10 + i)
            for i in range(1, 11)
        ]
        plain = (_labels("sha256:" + "2" * 64, "sha256:" + "b" * 64, {}), 5)
        already = (_labels(existing, "sha256:" + "c" * 64, TOC), 5)
        with running_bridge(layers) as bridge:
            transactions.clear()
            started = read_ahead_announced(bridge, sn.existing, [*announced, plain, already])
            assert started == [True] * 10 + [False, False]
            assert len(hops) == 1 and len(transactions) == 1
            # The plain layer is passed on too, for the trio side to remember it is not lazy;
            # the existing one is not.
            assert [size for _, size in layers.announced] == [*range(11, 21), 5]
            with pytest.raises(InvalidArgumentError):
                read_ahead_announced(bridge, sn.existing, announced * 30)
            assert len(announced * 30) > MAX_ANNOUNCED_LAYERS
    finally:
        sn.close()
