"""Unit tests of the client-side unpacker and of pull/unpack orchestration, on an in-memory
stand-in for containerd (content, images, leases, diff, snapshots) with its error semantics."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from registry import Descriptor, Index, Manifest, Platform
from snapshotter import labels as L
from snapshotter.client.chain import chain_ids
from snapshotter.client.containerd_api import ContainerdError, ContentInfo, ImageRecord
from snapshotter.client.documents import ImageDocuments
from snapshotter.client.progress import PlainProgress
from snapshotter.client.pull import store_and_unpack, unpack_existing
from snapshotter.client.unpacker import (
    MissingBlobError,
    Unpacker,
    UnpackError,
    plan_unpack,
)
from snapshotter.errors import AlreadyExistsError, NotFoundError
from snapshotter.model import Kind, Mount, SnapshotInfo


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Snapshot:
    kind: Kind
    parent: str
    labels: dict[str, str]


@dataclass
class FakeContainerd:
    snapshotter: str = "lazysnap"
    # chain IDs the snapshotter serves "remotely": Prepare commits them and answers ALREADY_EXISTS
    remote: set[str] = field(default_factory=set)
    content: dict[str, bytes] = field(default_factory=dict)
    content_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    images: dict[str, ImageRecord] = field(default_factory=dict)
    open_leases: list[str] = field(default_factory=list)
    leases_created: int = 0
    calls: list[tuple[str, str]] = field(default_factory=list)
    prepares: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    commits: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    applied_wrong: bool = False  # apply_diff reports a bogus diff ID
    stat_hides: set[str] = field(default_factory=set)  # Stat says NOT_FOUND for these
    fail_commit: Callable[[str], None] | None = None

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        self.leases_created += 1
        lease_id = f"lease-{self.leases_created}"
        self.open_leases.append(lease_id)
        try:
            yield lease_id
        finally:
            self.open_leases.remove(lease_id)

    def _in_lease(self, what: str) -> None:
        self.calls.append((what, self.open_leases[-1] if self.open_leases else ""))

    # content
    def content_info(self, digest: str) -> ContentInfo:
        if digest not in self.content:
            raise NotFoundError(f"content {digest}: not found")
        return ContentInfo(digest, len(self.content[digest]), self.content_labels.get(digest, {}))

    def read_content(self, digest: str, *, max_size: int) -> bytes:
        self.content_info(digest)
        return self.content[digest]

    def write_content(
        self,
        ref: str,
        chunks: Iterable[bytes],
        *,
        expected: str,
        total: int,
        labels: Mapping[str, str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> bool:
        self._in_lease(f"write {expected}")
        if expected in self.content:
            return False
        data = b""
        for chunk in chunks:
            data += chunk
            if on_progress is not None:
                on_progress(len(chunk))
        if sha256(data) != expected or len(data) != total:
            raise ContainerdError(f"write content {expected}: unexpected digest or size")
        self.content[expected] = data
        self.content_labels[expected] = dict(labels or {})
        return True

    def set_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        self.content_info(digest)
        self.content_labels.setdefault(digest, {}).update(labels)

    # images
    def get_image(self, name: str) -> ImageRecord:
        if name not in self.images:
            raise NotFoundError(f"image {name}: not found")
        return self.images[name]

    def put_image(self, image: ImageRecord) -> None:
        self._in_lease(f"image {image.name}")
        self.images[image.name] = image

    # snapshots
    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo:
        assert snapshotter == self.snapshotter
        if key not in self.snapshots or key in self.stat_hides:
            raise NotFoundError(f"snapshot {key}: not found")
        s = self.snapshots[key]
        return SnapshotInfo(key, s.parent, s.kind, 1, 1, dict(s.labels))

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        self._in_lease(f"prepare {key}")
        self.prepares.append((key, parent, dict(labels)))
        if key in self.snapshots:
            raise AlreadyExistsError(f"snapshot {key}: already exists")
        if parent and self.snapshots.get(parent, Snapshot(Kind.ACTIVE, "", {})).kind != Kind.COMMITTED:
            raise NotFoundError(f"parent {parent}: not found")
        ref = labels.get(L.SNAPSHOT_REF, "")
        if ref in self.remote:
            self.snapshots[ref] = Snapshot(Kind.COMMITTED, parent, dict(labels))
            raise AlreadyExistsError(f"target snapshot {ref!r}: already exists")
        self.snapshots[key] = Snapshot(Kind.ACTIVE, parent, dict(labels))
        return [Mount("bind", f"/fake/{len(self.snapshots)}", ("rw", "rbind"))]

    def commit_snapshot(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]
    ) -> None:
        self._in_lease(f"commit {name}")
        self.commits.append((name, key, dict(labels)))
        if self.fail_commit is not None:
            self.fail_commit(name)
        active = self.snapshots.get(key)
        if active is None or active.kind != Kind.ACTIVE:
            raise NotFoundError(f"snapshot {key}: not found")
        if name in self.snapshots:
            raise AlreadyExistsError(f"snapshot {name}: already exists")
        del self.snapshots[key]
        self.snapshots[name] = Snapshot(Kind.COMMITTED, active.parent, dict(labels))

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        if key not in self.snapshots:
            raise NotFoundError(f"snapshot {key}: not found")
        del self.snapshots[key]

    # diff
    def apply_diff(self, layer: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        self._in_lease(f"apply {layer.digest}")
        assert mounts, "apply needs the active snapshot's mounts"
        self.content_info(layer.digest)  # NOT_FOUND like containerd's differ
        tar = gzip.decompress(self.content[layer.digest])
        diff_id = sha256(b"corrupt" + tar) if self.applied_wrong else sha256(tar)
        return Descriptor("application/vnd.oci.image.layer.v1.tar", diff_id, len(tar))


# -- an image -------------------------------------------------------------------------------

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
REF = "registry.test/app:1"


def _tar(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class Image:
    blobs: list[bytes]
    diff_ids: list[str]
    manifest: Manifest
    manifest_bytes: bytes
    config: bytes

    @property
    def chains(self) -> list[str]:
        return chain_ids(self.diff_ids)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest_bytes)


def make_image(count: int = 3) -> Image:
    tars = [_tar(f"file{n}", f"layer {n}\n".encode()) for n in range(count)]
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = [sha256(t) for t in tars]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    layers = tuple(Descriptor(GZ, sha256(b), len(b)) for b in blobs)
    config_desc = Descriptor("application/vnd.oci.image.config.v1+json", sha256(config), len(config))
    manifest = Manifest("application/vnd.oci.image.manifest.v1+json", config_desc, layers)
    manifest_bytes = json.dumps({
        "schemaVersion": 2, "mediaType": manifest.media_type,
        "config": {"mediaType": config_desc.media_type, "digest": config_desc.digest,
                   "size": config_desc.size},
        "layers": [{"mediaType": GZ, "digest": d.digest, "size": d.size} for d in layers],
    }).encode()
    return Image(blobs, diff_ids, manifest, manifest_bytes, config)


class ListBlobs:
    """A BlobSource over in-memory blobs that counts what it was asked for."""

    def __init__(self, image: Image) -> None:
        self._by_digest = {sha256(b): b for b in image.blobs}
        self.opened: list[str] = []

    @contextlib.contextmanager
    def open(self, layer: Descriptor) -> Iterator[Iterable[bytes]]:
        self.opened.append(layer.digest)
        data = self._by_digest[layer.digest]
        yield [data[:10], data[10:]]


def unpacker(fake: FakeContainerd, image: Image, **kwargs: object) -> Unpacker:
    keys = iter(range(1000))
    return Unpacker(
        fake, "lazysnap", blobs=ListBlobs(image),
        new_key=lambda chain: f"extract-{next(keys)}-x {chain}", **kwargs,  # type: ignore[arg-type]
    )


def plan_for(image: Image):  # type: ignore[no-untyped-def]
    return plan_unpack(REF, image.manifest_digest, image.manifest, image.config)


def with_config(fake: FakeContainerd, image: Image) -> FakeContainerd:
    fake.content[sha256(image.config)] = image.config
    return fake


# -- the unpacker ---------------------------------------------------------------------------


def test_fallback_applies_and_commits_every_layer_with_cri_labels() -> None:
    image = make_image(3)
    fake = with_config(FakeContainerd(), image)
    results = unpacker(fake, image).unpack(plan_for(image))

    assert [r.outcome for r in results] == ["applied"] * 3
    chains = image.chains
    for n, (key, parent, labels) in enumerate(fake.prepares):
        assert re.fullmatch(rf"extract-\d+-\S+ {re.escape(chains[n])}", key)
        assert parent == (chains[n - 1] if n else "")
        assert labels[L.SNAPSHOT_REF] == chains[n]
        assert labels[L.CRI_LAYER_DIGEST] == image.manifest.layers[n].digest
        assert labels[L.CRI_IMAGE_REF] == REF
        assert labels[L.CRI_MANIFEST_DIGEST] == image.manifest_digest
        assert labels[L.CRI_IMAGE_LAYERS].split(",") == [
            d.digest for d in image.manifest.layers[n:]
        ]
    # Commit carries the same labels, as containerd's unpacker passes them.
    assert [(name, labels) for name, _key, labels in fake.commits] == [
        (chains[n], fake.prepares[n][2]) for n in range(3)
    ]
    assert {k: (s.kind, s.parent) for k, s in fake.snapshots.items()} == {
        chains[0]: (Kind.COMMITTED, ""),
        chains[1]: (Kind.COMMITTED, chains[0]),
        chains[2]: (Kind.COMMITTED, chains[1]),
    }
    for blob, diff_id in zip(image.blobs, image.diff_ids, strict=True):
        assert fake.content_labels[sha256(blob)][L.UNCOMPRESSED] == diff_id
    assert fake.content_labels[sha256(image.config)] == {
        "containerd.io/gc.ref.snapshot.lazysnap": chains[-1]
    }
    assert [r.size for r in results] == [len(b) for b in image.blobs]


def test_remote_layers_are_skipped_after_stat() -> None:
    image = make_image(3)
    fake = with_config(FakeContainerd(), image)
    fake.remote = {image.chains[0], image.chains[2]}
    blobs = ListBlobs(image)
    results = Unpacker(fake, "lazysnap", blobs=blobs).unpack(plan_for(image))

    assert [r.outcome for r in results] == ["remote", "applied", "remote"]
    assert blobs.opened == [image.manifest.layers[1].digest]  # only the local layer is fetched
    assert [name for name, _key, _labels in fake.commits] == [image.chains[1]]
    assert fake.snapshots[image.chains[2]].parent == image.chains[1]


def test_existing_chain_is_not_prepared_again() -> None:
    image = make_image(2)
    fake = with_config(FakeContainerd(), image)
    unpacker(fake, image).unpack(plan_for(image))
    prepares = len(fake.prepares)
    again = unpacker(fake, image).unpack(plan_for(image))
    assert [r.outcome for r in again] == ["exists", "exists"]
    assert len(fake.prepares) == prepares


def test_blob_already_in_content_store_is_not_fetched() -> None:
    image = make_image(2)
    fake = with_config(FakeContainerd(), image)
    for blob in image.blobs:
        fake.content[sha256(blob)] = blob
    results = Unpacker(fake, "lazysnap").unpack(plan_for(image))  # no blob source at all
    assert [(r.outcome, r.size) for r in results] == [("applied", 0), ("applied", 0)]


def test_missing_blob_without_source_is_an_error_and_leaves_no_active_snapshot() -> None:
    image = make_image(2)
    fake = with_config(FakeContainerd(), image)
    with pytest.raises(MissingBlobError, match="not in containerd's content store"):
        Unpacker(fake, "lazysnap").unpack(plan_for(image))
    assert fake.snapshots == {}


def test_diff_id_mismatch_fails_and_removes_the_active_snapshot() -> None:
    image = make_image(2)
    fake = with_config(FakeContainerd(applied_wrong=True), image)
    with pytest.raises(UnpackError, match="image config says"):
        unpacker(fake, image).unpack(plan_for(image))
    assert fake.snapshots == {} and fake.commits == []


def test_commit_already_exists_counts_as_success() -> None:
    image = make_image(1)
    fake = with_config(FakeContainerd(), image)

    def someone_else_committed(name: str) -> None:
        fake.snapshots[name] = Snapshot(Kind.COMMITTED, "", {})

    fake.fail_commit = someone_else_committed
    results = unpacker(fake, image).unpack(plan_for(image))
    assert [r.outcome for r in results] == ["applied"]
    assert list(fake.snapshots) == [image.chains[0]]  # the extraction key is gone


def test_prepare_exists_but_stat_missing_retries_then_fails() -> None:
    image = make_image(1)
    fake = with_config(FakeContainerd(), image)
    fake.remote = {image.chains[0]}
    fake.stat_hides = {image.chains[0]}
    with pytest.raises(UnpackError, match="cannot be found"):
        unpacker(fake, image).unpack(plan_for(image))
    assert len(fake.prepares) == 3


def test_plan_refuses_a_config_that_does_not_match_the_manifest() -> None:
    image = make_image(2)
    short = json.dumps({"rootfs": {"type": "layers", "diff_ids": image.diff_ids[:1]}}).encode()
    with pytest.raises(UnpackError, match="2 layers but its config lists 1"):
        plan_unpack(REF, image.manifest_digest, image.manifest, short)


# -- pull / unpack orchestration ------------------------------------------------------------


def documents(image: Image, *, with_index: bool) -> ImageDocuments:
    target = Descriptor(image.manifest.media_type, image.manifest_digest, len(image.manifest_bytes))
    index = None
    target_content = image.manifest_bytes
    if with_index:
        entry = Descriptor(
            image.manifest.media_type, image.manifest_digest, len(image.manifest_bytes),
            platform=Platform("linux", "amd64"),
        )
        index = Index("application/vnd.oci.image.index.v1+json", (entry,))
        target_content = json.dumps({
            "schemaVersion": 2, "mediaType": index.media_type,
            "manifests": [{"mediaType": entry.media_type, "digest": entry.digest,
                           "size": entry.size,
                           "platform": {"os": "linux", "architecture": "amd64"}}],
        }).encode()
        target = Descriptor(index.media_type, sha256(target_content), len(target_content))
    return ImageDocuments(
        REF, target, target_content, index, image.manifest_digest, image.manifest_bytes,
        image.manifest, image.config,
    )


def test_store_and_unpack_labels_documents_for_gc_and_names_the_image_last() -> None:
    image = make_image(2)
    fake = FakeContainerd()
    docs = documents(image, with_index=True)
    out = io.StringIO()
    results = store_and_unpack(fake, docs, "lazysnap", ListBlobs(image), PlainProgress(out))

    assert [r.outcome for r in results] == ["applied", "applied"]
    assert fake.images[REF].target == docs.target
    manifest_labels = fake.content_labels[image.manifest_digest]
    assert manifest_labels["containerd.io/gc.ref.content.config"] == sha256(image.config)
    assert manifest_labels["containerd.io/gc.ref.content.l.1"] == image.manifest.layers[1].digest
    assert fake.content_labels[docs.target.digest] == {
        "containerd.io/gc.ref.content.m.0": image.manifest_digest
    }
    # Everything ran inside one lease, and the image record came after the layers.
    assert {lease for _what, lease in fake.calls} == {"lease-1"} and fake.open_leases == []
    assert fake.calls[-1] == (f"image {REF}", "lease-1")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"layer 1/2 {image.manifest.layers[0].digest} applied")
    assert lines[0].endswith(" s")


def test_failed_pull_closes_the_lease_and_names_no_image() -> None:
    image = make_image(2)
    fake = FakeContainerd(applied_wrong=True)
    with pytest.raises(UnpackError):
        store_and_unpack(
            fake, documents(image, with_index=False), "lazysnap", ListBlobs(image),
            PlainProgress(io.StringIO()),
        )
    assert fake.images == {} and fake.open_leases == [] and fake.leases_created == 1


def test_unpack_existing_reads_everything_from_containerd() -> None:
    image = make_image(2)
    fake = FakeContainerd()
    docs = documents(image, with_index=True)
    fake.content[docs.target.digest] = docs.target_content
    fake.content[image.manifest_digest] = image.manifest_bytes
    fake.content[sha256(image.config)] = image.config
    for blob in image.blobs:
        fake.content[sha256(blob)] = blob
    fake.images[REF] = ImageRecord(REF, docs.target)

    _docs, results = unpack_existing(
        fake, REF, "lazysnap", Platform("linux", "amd64"), PlainProgress(io.StringIO())
    )
    assert [r.outcome for r in results] == ["applied", "applied"]
    assert set(fake.snapshots) == set(image.chains)
    assert fake.open_leases == [] and fake.leases_created == 1


def test_unpack_of_an_unknown_image_says_so() -> None:
    with pytest.raises(NotFoundError, match="not in containerd"):
        unpack_existing(
            FakeContainerd(), "nope:1", "lazysnap", None, PlainProgress(io.StringIO())
        )


def test_the_manifests_soci_v2_index_digest_goes_with_every_layers_labels() -> None:
    import dataclasses  # noqa: PLC0415

    image = make_image(2)
    index = "sha256:" + "5" * 64
    key = L.ANNOTATION_LABEL_PREFIX + "com.amazon.soci.index-digest"
    assert all(key not in layer.labels for layer in plan_for(image).layers)
    manifest = dataclasses.replace(
        image.manifest, annotations={"com.amazon.soci.index-digest": index, "other": "x"}
    )
    plan = plan_unpack(REF, image.manifest_digest, manifest, image.config)
    assert [layer.labels[key] for layer in plan.layers] == [index, index]
    assert all(L.ANNOTATION_LABEL_PREFIX + "other" not in layer.labels for layer in plan.layers)


@dataclass
class CountingStats(FakeContainerd):
    stats: list[str] = field(default_factory=list)

    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo:
        self.stats.append(key)
        return super().stat_snapshot(snapshotter, key)


class ContainerdApplies:
    """A direct path that downloads nothing ahead and leaves every layer to containerd."""

    def __init__(self) -> None:
        self.prefetched: list[str] = []

    def prefetch(self, layers: Sequence[Descriptor]) -> list[Descriptor]:
        self.prefetched += [layer.digest for layer in layers]
        return []

    def apply(self, layer: Descriptor, diff_id: str, mounts: Sequence[Mount]) -> int | None:
        return None


def test_with_the_direct_path_each_chain_is_looked_up_once_before_its_layer() -> None:
    # Each Stat is a round trip through containerd to the snapshotter: the answers the direct
    # path's prefetch needed are not asked for again.
    image, bottom = make_image(3), make_image(1)  # the same first layer
    fake = with_config(with_config(CountingStats(), image), bottom)
    unpacker(fake, bottom).unpack(plan_for(bottom))
    assert bottom.chains[0] == image.chains[0]
    fake.remote = {image.chains[2]}
    fake.stats.clear()
    direct = ContainerdApplies()
    results = unpacker(fake, image, direct=direct).unpack(plan_for(image))

    assert [r.outcome for r in results] == ["exists", "applied", "remote"]
    assert direct.prefetched == [d.digest for d in image.manifest.layers[1:]]
    # One Stat per chain up front, then the one that confirms the remote layer's Prepare.
    assert fake.stats == [*image.chains, image.chains[2]]
