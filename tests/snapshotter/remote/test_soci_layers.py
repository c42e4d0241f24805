"""LazyLayers serves a plain gzip layer through its image's SOCI index: from CRI's labels alone
(the manifest, fetched once, names the v2 index), and falls back when nothing lists it."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path
from typing import Any

import trio

from fusefs import LayerMeters
from fusefs.formats.ztoc import ZtocLayer, build_ztoc
from registry.manifest import OCI_MANIFEST
from snapshotter.labels import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    SNAPSHOT_REF,
    SOCI_ZTOC_DIGEST,
)
from snapshotter.remote.layers import LazyLayers
from snapshotter.soci_index import IMAGE_INDEX_DIGEST, SociIndex, ZtocDescriptor, build
from snapshotter.startup_profile import ARTIFACT_TYPE
from snapshotter.store.remote import RemoteLayerError
from tests.registry.fake_registry import FakeRegistry, make_client
from tests.support.oci_image import TarBuilder

IMAGE = "reg.test/team/app:v1"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


class FakeFilesystem:
    def __init__(self) -> None:
        self.attached: dict[str, Any] = {}
        self._meters: dict[str, LayerMeters] = {}

    async def attach(self, layer_id: str, blob: Any, index: Any, **_: Any) -> Path:
        self.attached[layer_id] = index
        return Path("/nowhere") / layer_id

    def slot_of(self, layer_id: str) -> int:
        return 1

    def layer_ids(self) -> list[str]:
        return list(self.attached)

    def meters(self, layer_id: str) -> LayerMeters:
        return self._meters.setdefault(layer_id, LayerMeters())


def _image(fake: FakeRegistry, *, soci: bool) -> tuple[str, list[str]]:
    """Two plain gzip layers; with ``soci`` a v2 index listing the first. Returns the manifest
    digest and the layer digests."""
    blobs = [gzip.compress(TarBuilder().file(f"f{i}", b"x" * 5000 * (i + 1)).tar(), mtime=0)
             for i in range(2)]
    layers = [fake.add_blob(b) for b in blobs]
    annotations = {}
    if soci:
        ztoc = build_ztoc(io.BytesIO(blobs[0]), span_size=4096)
        ztoc_digest = fake.add_blob(ztoc.data)
        index = build(SociIndex(2, {layers[0]: ZtocDescriptor(ztoc_digest, len(ztoc.data),
                                                              layers[0], GZIP)}))
        annotations[IMAGE_INDEX_DIGEST] = fake.add_manifest(index, OCI_MANIFEST)
    config = fake.add_blob(b"{}")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                   "size": 2},
        "layers": [{"mediaType": GZIP, "digest": d, "size": len(b)}
                   for d, b in zip(layers, blobs, strict=True)],
        "annotations": annotations,
    }).encode()
    return fake.add_manifest(manifest, OCI_MANIFEST), layers


def _cri_labels(manifest: str, layers: list[str], number: int) -> dict[str, str]:
    return {
        SNAPSHOT_REF: "sha256:" + str(number) * 64,
        CRI_IMAGE_REF: IMAGE,
        CRI_LAYER_DIGEST: layers[number],
        CRI_MANIFEST_DIGEST: manifest,
        CRI_IMAGE_LAYERS: ",".join(layers[number:]),
    }


def _soci_referrers(fake: FakeRegistry) -> list[Any]:
    """Referrers requests of the SOCI lookup (the startup profile lookup asks too, filtered by
    its own artifact type)."""
    return [r for r in fake.requests if "/referrers/" in r.url.path
            and ARTIFACT_TYPE not in r.url.params.get("artifactType", "")]


def _mount_both(fake: FakeRegistry, manifest: str, layers: list[str], tmp_path: Path,
                ) -> tuple[FakeFilesystem, list[Any]]:
    fs = FakeFilesystem()
    outcomes: list[Any] = []

    async def main() -> None:
        async with make_client(fake) as client:
            lazy = LazyLayers(fs, client, lambda layer_id: tmp_path / f"{layer_id}.tail")  # type: ignore[arg-type]
            for number in range(2):
                try:
                    outcomes.append(await lazy.mount(
                        _cri_labels(manifest, layers, number), f"l{number}"))
                except RemoteLayerError as exc:
                    outcomes.append(exc)

    trio.run(main)
    return fs, outcomes


def test_cri_labels_alone_find_the_v2_index_through_the_manifest(tmp_path: Path) -> None:
    fake = FakeRegistry()
    manifest, layers = _image(fake, soci=True)
    fs, (first, second) = _mount_both(fake, manifest, layers, tmp_path)
    assert isinstance(fs.attached["l0"], ZtocLayer)
    assert first.format == "soci" and SOCI_ZTOC_DIGEST in first.annotations
    assert isinstance(second, RemoteLayerError) and "no SOCI index" in str(second)
    gets = [r.url.path for r in fake.requests]
    assert gets.count(f"/v2/team/app/manifests/{manifest}") == 1
    assert not _soci_referrers(fake)  # v2: no referrers asked for SOCI indexes


def test_an_image_without_an_index_is_looked_up_once(tmp_path: Path) -> None:
    fake = FakeRegistry()
    manifest, layers = _image(fake, soci=False)
    fs, outcomes = _mount_both(fake, manifest, layers, tmp_path)
    assert not fs.attached
    assert all(isinstance(o, RemoteLayerError) for o in outcomes)
    assert len(_soci_referrers(fake)) == 1


def test_a_restart_reattaches_from_the_saved_ztoc_without_the_network(tmp_path: Path) -> None:
    from snapshotter.store.metadata import RemoteLayerRecord  # noqa: PLC0415

    fake = FakeRegistry()
    manifest, layers = _image(fake, soci=True)
    _, (first, _) = _mount_both(fake, manifest, layers, tmp_path)
    fake.requests.clear()
    record = RemoteLayerRecord(1, "l0", 1, IMAGE, layers[0], first.blob_size, first.toc_digest,
                               first.annotations)
    fs = FakeFilesystem()

    async def main() -> None:
        async with make_client(fake) as client:
            lazy = LazyLayers(fs, client, lambda layer_id: tmp_path / f"{layer_id}.tail")  # type: ignore[arg-type]
            await lazy.restore(record)

    trio.run(main)
    assert isinstance(fs.attached["l0"], ZtocLayer)
    assert fs.attached["l0"].toc_digest == first.annotations[SOCI_ZTOC_DIGEST]
    assert fake.requests == []


def test_announced_layers_start_the_lookup_before_their_prepares(tmp_path: Path) -> None:
    from snapshotter.client.chain import layer_labels  # noqa: PLC0415

    fake = FakeRegistry()
    manifest, layers = _image(fake, soci=False)
    labels = [
        layer_labels(image_ref=IMAGE, manifest_digest=manifest, layer_digests=layers, index=i,
                     chain_id="sha256:" + str(i) * 64, media_type=GZIP)
        for i in range(2)
    ]
    fs = FakeFilesystem()

    async def main() -> tuple[int, int]:
        async with make_client(fake) as client:
            lazy = LazyLayers(fs, client, lambda layer_id: tmp_path / f"{layer_id}.tail")  # type: ignore[arg-type]
            lazy.read_ahead([(one, None) for one in labels])
            with trio.fail_after(10):
                while not _soci_referrers(fake):
                    await trio.sleep(0.01)
            for number, one in enumerate(labels):
                with contextlib.suppress(RemoteLayerError):
                    await lazy.mount(one, f"l{number}")
            return lazy.soci.requests, len(_soci_referrers(fake))

    assert trio.run(main) == (1, 1)


def test_announced_layers_that_cannot_be_lazy_start_no_lookup(tmp_path: Path) -> None:
    from snapshotter.client.chain import layer_labels  # noqa: PLC0415

    fake = FakeRegistry()
    manifest, layers = _image(fake, soci=False)

    def labels(media_type: str) -> list[dict[str, str]]:
        return [layer_labels(image_ref=IMAGE, manifest_digest=manifest, layer_digests=layers,
                             index=i, chain_id="sha256:" + str(i) * 64, media_type=media_type)
                for i in range(2)]

    async def main() -> list[bool]:
        async with make_client(fake) as client:
            lazy = LazyLayers(FakeFilesystem(), client,  # type: ignore[arg-type]
                              lambda layer_id: tmp_path / f"{layer_id}.tail")
            # Plain zstd layers: no lazy format, no SOCI index to look for.
            started = lazy.read_ahead([(one, None) for one in labels(ZSTD)])
            await trio.sleep(0.5)
            assert lazy.profiles.requests == 0 and lazy.soci.requests == 0
            # Plain gzip layers may have a zTOC: their image's profile is looked up once.
            lazy.read_ahead([(one, None) for one in labels(GZIP)])
            with trio.fail_after(10):
                while lazy.profiles.requests == 0:
                    await trio.sleep(0.01)
            return started

    assert trio.run(main) == [False, False]
