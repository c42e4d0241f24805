"""TOCs read ahead of their Prepare: reused only as far as the Prepare's own digests allow."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from snapshotter.labels import ESTARGZ_TOC_DIGEST
from snapshotter.remote.toc_ahead import AheadLayer, TocReadAhead
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


def _ahead(client: FakeClient, **kwargs: Any) -> TocReadAhead:
    return TocReadAhead(client, **kwargs)  # type: ignore[arg-type]


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
    assert taken.toc is not None and taken.toc.trusted and taken.built is not None
    assert (await taken.built()).toc_trusted
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
    assert taken is not None and taken.toc is None and taken.built is None and taken.ranges


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


@trio_test
async def test_an_index_nobody_takes_is_dropped_without_another_read_ahead() -> None:
    blob, annotations = _layer()
    ahead = _ahead(FakeClient({blob.digest: blob}), lifetime=0.3)
    assert ahead.start(AheadLayer(IMAGE, blob.digest, None, None, annotations))
    assert ahead.pending() == 1
    await trio.sleep(0.6)  # the Prepare never came, and no other layer was announced
    assert ahead.pending() == 0
    assert await ahead.take(blob.digest, toc_digest=None, annotations=annotations) is None


@trio_test
async def test_a_layer_known_not_to_be_lazy_is_not_read_ahead() -> None:
    blob, _ = _layer()
    client = FakeClient({blob.digest: blob})
    ahead = _ahead(client)
    ahead.not_lazy(blob.digest)
    assert not ahead.start(AheadLayer(IMAGE, blob.digest, None, None, None))
    assert await ahead.take(blob.digest, toc_digest=None, annotations={}) is None
    assert client.opened == []


@trio_test
async def test_the_prepare_takes_a_checked_toc_without_waiting_for_its_index(
    monkeypatch: Any,
) -> None:
    from fusefs import LayerFormatError  # noqa: PLC0415
    from snapshotter.remote import toc_ahead  # noqa: PLC0415

    release = trio.Event()

    async def held_build(toc: Any, **kwargs: Any) -> Any:
        await release.wait()
        raise LayerFormatError("hostile entries behind a valid digest")

    monkeypatch.setattr(toc_ahead, "build_index_off_loop", held_build)
    blob, annotations = _layer()
    ahead = _ahead(FakeClient({blob.digest: blob}))
    toc = annotations[ESTARGZ_TOC_DIGEST]
    assert ahead.start(AheadLayer(IMAGE, blob.digest, blob.size, toc, annotations))
    with trio.fail_after(5):  # answered while the build is held
        taken = await ahead.take(blob.digest, toc_digest=toc, annotations=annotations)
    assert taken is not None and taken.toc is not None and taken.built is not None
    assert taken.toc.json_digest == toc
    release.set()
    with pytest.raises(LayerFormatError, match="hostile"):  # reaches whoever attaches it
        await taken.built()
