"""TOCs read ahead of their Prepare: reused only as far as the Prepare's own digests allow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.client.chain import layer_labels
from snapshotter.errors import InvalidArgumentError
from snapshotter.labels import ESTARGZ_TOC_DIGEST
from snapshotter.remote.toc_ahead import AheadLayer, TailsAhead
from snapshotter.store.snapshots import MAX_ANNOUNCED_LAYERS, Snapshotter
from tests.fusefs.formats_support import MemoryBlob
from tests.integration.fuse_support import trio_test
from tests.support.oci_image import TarBuilder, seekable_layer

IMAGE = "127.0.0.1:5000/ahead/test:1"


def _layer() -> tuple[MemoryBlob, dict[str, str]]:
    tar = TarBuilder().dir("etc").file("etc/hello", b"hello\n" * 100).tar()
    layer = seekable_layer(tar, "estargz")
    return MemoryBlob(layer.blob), dict(layer.annotations)


class FakeClient:
    def __init__(self, blobs: dict[str, MemoryBlob], *, gate: trio.Event | None = None) -> None:
        self.blobs = blobs
        self.opened: list[tuple[str, int | None]] = []
        self.gate = gate

    async def open_blob(self, ref: Any, digest: str, size: int | None = None) -> MemoryBlob:
        self.opened.append((digest, size))
        if self.gate is not None:
            await self.gate.wait()
        if digest not in self.blobs:
            raise LookupError(f"no blob {digest}")
        return self.blobs[digest]


def _ahead(client: FakeClient, **kwargs: Any) -> TailsAhead:
    return TailsAhead(client, **kwargs)  # type: ignore[arg-type]


@trio_test
async def test_the_prepare_takes_ranges_and_index_read_with_its_own_digests() -> None:
    blob, annotations = _layer()
    client = FakeClient({blob.digest: blob})
    ahead = _ahead(client)
    toc = annotations[ESTARGZ_TOC_DIGEST]
    assert ahead.start(AheadLayer(IMAGE, blob.digest, blob.size, toc, annotations))
    assert not ahead.start(AheadLayer(IMAGE, blob.digest, blob.size, toc, annotations))
    taken = await ahead.take(blob.digest, toc_digest=toc, annotations=annotations)
    assert taken is not None and taken.blob is blob
    assert taken.index is not None and taken.index.toc_trusted
    # The ranges are exactly what the TOC reader read: nothing more is needed at Prepare time.
    assert sorted(taken.ranges) == sorted(offset for offset, _ in blob.reads)
    assert client.opened == [(blob.digest, blob.size)]  # the size came along: no HEAD
    assert await ahead.take(blob.digest, toc_digest=toc, annotations=annotations) is None


@trio_test
async def test_an_index_read_without_the_prepares_digests_is_not_handed_over() -> None:
    blob, annotations = _layer()
    ahead = _ahead(FakeClient({blob.digest: blob}))
    ahead.start(AheadLayer(IMAGE, blob.digest, None, None, None))  # a cri.image-layers neighbour
    taken = await ahead.take(
        blob.digest, toc_digest=annotations[ESTARGZ_TOC_DIGEST], annotations=annotations
    )
    assert taken is not None and taken.index is None and taken.ranges


@trio_test
async def test_a_failed_read_leaves_the_prepare_to_read_itself() -> None:
    ahead = _ahead(FakeClient({}))
    ahead.start(AheadLayer(IMAGE, "sha256:" + "a" * 64, None, None, None))
    assert await ahead.take("sha256:" + "a" * 64, toc_digest=None, annotations={}) is None


@trio_test
async def test_take_waits_for_a_read_in_flight() -> None:
    blob, annotations = _layer()
    gate = trio.Event()
    ahead = _ahead(FakeClient({blob.digest: blob}, gate=gate))
    ahead.start(AheadLayer(IMAGE, blob.digest, None, None, annotations))
    result: list[object] = []

    async def prepare() -> None:
        result.append(await ahead.take(blob.digest, toc_digest=None, annotations=annotations))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prepare)
        await trio.sleep(0.05)
        assert result == []
        gate.set()
    assert result and result[0] is not None


@trio_test
async def test_capacity_and_lifetime_bound_what_is_kept() -> None:
    blob, _ = _layer()
    ahead = _ahead(FakeClient({blob.digest: blob}), capacity=2, lifetime=0.2)
    digests = ["sha256:" + c * 64 for c in "abc"]
    assert [ahead.start(AheadLayer(IMAGE, d, None, None, None)) for d in digests] == [
        True,
        True,
        False,
    ]
    await trio.sleep(0.3)  # nobody took them: dropped, room again
    assert ahead.start(AheadLayer(IMAGE, digests[2], None, None, None))
    assert ahead.pending() == 1


class RecordingRemote:
    def __init__(self) -> None:
        self.announced: list[tuple[Any, int | None]] = []

    def read_ahead(self, announced: list[tuple[Any, int | None]]) -> int:
        self.announced.extend(announced)
        return sum(1 for decision, _ in announced if decision.format is not None)


def _labels(chain: str, digest: str, annotations: dict[str, str]) -> dict[str, str]:
    return layer_labels(
        image_ref=IMAGE, manifest_digest="sha256:" + "m" * 64, layer_digests=[digest],
        index=0, chain_id=chain, annotations=annotations,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
    )  # fmt: skip


def test_snapshotter_announces_only_lazy_layers_that_do_not_exist(tmp_path: Path) -> None:
    _, annotations = _layer()
    sn = Snapshotter(tmp_path / "root")
    try:
        remote = RecordingRemote()
        sn.enable_remote(remote)  # type: ignore[arg-type]
        existing = "sha256:" + "e" * 64
        sn.prepare("extract", "", {})
        sn.commit(existing, "extract", {})
        lazy = _labels("sha256:" + "1" * 64, "sha256:" + "a" * 64, annotations)
        plain = _labels("sha256:" + "2" * 64, "sha256:" + "b" * 64, {})
        already = _labels(existing, "sha256:" + "c" * 64, annotations)
        assert sn.read_ahead([(lazy, 1234), (plain, 10), (already, 10)]) == 1
        # The plain layer is passed on too, to be remembered as not lazy.
        (decision, size), (plain_decision, _) = remote.announced
        assert decision.request.layer_digest == "sha256:" + "a" * 64 and size == 1234
        assert plain_decision.format is None
        assert plain_decision.request.layer_digest == "sha256:" + "b" * 64
        with pytest.raises(InvalidArgumentError):
            sn.read_ahead([(lazy, 1)] * (MAX_ANNOUNCED_LAYERS + 1))
    finally:
        sn.close()


@trio_test
async def test_a_layer_known_not_to_be_lazy_is_not_read_ahead() -> None:
    blob, _ = _layer()
    client = FakeClient({blob.digest: blob})
    ahead = _ahead(client)
    ahead.not_lazy(blob.digest)
    assert not ahead.start(AheadLayer(IMAGE, blob.digest, None, None, None))
    assert await ahead.take(blob.digest, toc_digest=None, annotations={}) is None
    assert client.opened == []
