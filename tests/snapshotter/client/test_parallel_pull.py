"""Parallel pull: range planning, spools, the ranged fetcher, streaming verification, and whole
pulls from an in-memory registry into the in-memory containerd whose snapshots are real
directories, so that the direct unpack can be checked file by file."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import tarfile
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from registry import Descriptor, Manifest, RangeNotSupportedError
from snapshotter.client.fetch_settings import FetchSettings
from snapshotter.client.layer_reader import LayerDigestError, LayerReader, TruncatedLayerError
from snapshotter.client.parallel_fetch import ParallelFetcher, TruncatedRangeError
from snapshotter.client.progress import LayerResult, NoProgress
from snapshotter.client.spool import Spool, plan_ranges
from snapshotter.commands import pull as pull_command
from snapshotter.model import Mount
from tests.registry.fake_registry import FakeRegistry
from tests.snapshotter.client.test_unpacker_flow import FakeContainerd, Image, sha256
from tests.support.fake_pull import OCI_MANIFEST, REF, pull_results, registry_with

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
SMALL = FetchSettings(connections=3, range_size=1000)


# -- range planning and the spool -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5500])
def test_ranges_cover_the_blob_once_in_order(size: int) -> None:
    ranges = plan_ranges(size, 1000)
    assert len(ranges) == math.ceil(size / 1000)
    covered = 0
    for offset, length in ranges:
        assert offset == covered and 0 < length <= 1000
        covered += length
    assert covered == size


def test_ranges_refuse_a_zero_range_size() -> None:
    with pytest.raises(ValueError):
        plan_ranges(10, 0)


def test_spool_reads_in_order_what_arrives_out_of_order(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    spool = Spool(tmp_path / "blob", len(data))
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.extend(spool.chunks(chunk_size=700)))
    reader.start()
    for offset, length in reversed(plan_ranges(len(data), 3000)):
        spool.write_at(offset, data[offset : offset + length])
    reader.join(10)
    assert b"".join(read) == data
    assert spool.settled


def test_spool_reader_gets_the_download_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "blob", 2000)
    spool.write_at(0, b"a" * 1000)
    chunks = spool.chunks()
    assert next(chunks) == b"a" * 1000
    spool.fail(TruncatedRangeError("cut"))
    with pytest.raises(TruncatedRangeError):
        next(chunks)


def test_spool_refuses_writes_outside_the_blob_and_after_close(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "blob", 10)
    with pytest.raises(Exception, match="outside"):
        spool.write_at(8, b"xyz")
    spool.close()
    with pytest.raises(Exception, match="closed"):
        spool.write_at(0, b"x")


# -- the fetcher -----------------------------------------------------------------------------


@dataclass
class ScriptedBlob:
    data: bytes
    registry: ScriptedRegistry

    async def read_at(self, offset: int, length: int) -> bytes:
        r = self.registry
        if not r.ranges:
            raise RangeNotSupportedError("no ranges here")
        r.in_flight += 1
        r.most_in_flight = max(r.most_in_flight, r.in_flight)
        await trio.sleep(0.01)
        r.in_flight -= 1
        r.reads.append(offset)
        end = offset + length - (r.cut if offset == 0 else 0)
        return self.data[offset:end]


@dataclass
class ScriptedRegistry:
    blobs: Mapping[str, bytes]
    ranges: bool = True
    cut: int = 0  # bytes missing from the answer to the first range
    in_flight: int = 0
    most_in_flight: int = 0
    reads: list[int] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)

    async def open_blob(self, ref: object, digest: str, size: int | None = None) -> ScriptedBlob:
        return ScriptedBlob(self.blobs[digest], self)

    async def download_blob(self, ref: object, digest: str, dest: Path) -> int:
        self.downloads.append(digest)
        dest.write_bytes(self.blobs[digest])
        return len(self.blobs[digest])


def fetch_all(registry: ScriptedRegistry, layers: list[Descriptor], scratch: Path) -> list[bytes]:
    """Start every layer, then read each spool in order, as the unpacker does from its thread."""

    async def main() -> list[bytes] | Exception:
        async with trio.open_nursery() as nursery:
            fetcher = ParallelFetcher(
                registry, REF, scratch, nursery, trio.lowlevel.current_trio_token(), SMALL
            )

            def read() -> list[bytes]:
                fetcher.start(layers)
                try:
                    return [b"".join(fetcher.spool(layer).chunks()) for layer in layers]
                finally:
                    fetcher.close()

            try:
                return await trio.to_thread.run_sync(read)
            except Exception as exc:  # raised below, not in the nursery's exception group
                return exc
            finally:
                nursery.cancel_scope.cancel()

    result = trio.run(main)
    if isinstance(result, Exception):
        raise result
    return result


def descriptor(data: bytes) -> Descriptor:
    return Descriptor(GZ, sha256(data), len(data))


def test_fetcher_reads_ranges_over_several_connections(tmp_path: Path) -> None:
    blobs = [os.urandom(4500), os.urandom(2500)]
    registry = ScriptedRegistry({sha256(b): b for b in blobs})
    assert fetch_all(registry, [descriptor(b) for b in blobs], tmp_path) == blobs
    assert len(registry.reads) == 5 + 3
    assert registry.most_in_flight == SMALL.connections
    assert registry.downloads == []
    assert list(tmp_path.iterdir()) == []  # spools are dropped once read


def test_fetcher_downloads_whole_blobs_from_a_registry_without_ranges(tmp_path: Path) -> None:
    blob = os.urandom(4500)
    registry = ScriptedRegistry({sha256(blob): blob}, ranges=False)
    assert fetch_all(registry, [descriptor(blob)], tmp_path) == [blob]
    assert registry.downloads == [sha256(blob)]  # one stream, however many workers saw it fail


def test_fetcher_reports_a_truncated_range(tmp_path: Path) -> None:
    blob = os.urandom(4500)
    registry = ScriptedRegistry({sha256(blob): blob}, cut=10)
    with pytest.raises(TruncatedRangeError):
        fetch_all(registry, [descriptor(blob)], tmp_path)


# -- streaming verification ------------------------------------------------------------------


def tar_of(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pieces(data: bytes, size: int = 333) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def read_all(reader: LayerReader) -> bytes:
    out = b""
    while chunk := reader.read(500):
        out += chunk
    reader.finish()
    return out


def test_reader_inflates_and_verifies_while_reading() -> None:
    tar = tar_of({"a": os.urandom(3000), "b": b"bee"})
    blob = gzip.compress(tar)
    reader = LayerReader(pieces(blob), digest=sha256(blob), diff_id=sha256(tar), gzip=True)
    assert read_all(reader) == tar
    assert reader.compressed_bytes == len(blob)


def test_reader_reads_a_gzip_of_several_members() -> None:
    tar = tar_of({"a": os.urandom(3000)})
    blob = gzip.compress(tar[:1000]) + gzip.compress(tar[1000:])
    reader = LayerReader(pieces(blob), digest=sha256(blob), diff_id=sha256(tar), gzip=True)
    assert read_all(reader) == tar


def test_reader_refuses_a_blob_that_does_not_match_its_digest() -> None:
    tar = tar_of({"a": b"x"})
    blob = gzip.compress(tar)
    other = gzip.compress(tar, compresslevel=1, mtime=12345)
    reader = LayerReader(pieces(other), digest=sha256(blob), diff_id=sha256(tar), gzip=True)
    with pytest.raises(LayerDigestError, match="downloaded blob"):
        read_all(reader)


def test_reader_refuses_a_tar_that_does_not_match_its_diff_id() -> None:
    tar = tar_of({"a": b"x"})
    blob = gzip.compress(tar)
    reader = LayerReader(pieces(blob), digest=sha256(blob), diff_id=sha256(b"other"), gzip=True)
    with pytest.raises(LayerDigestError, match="image config"):
        read_all(reader)


def test_reader_refuses_a_truncated_gzip_stream() -> None:
    tar = tar_of({"a": os.urandom(5000)})
    blob = gzip.compress(tar)[:-20]
    reader = LayerReader(pieces(blob), digest=sha256(blob), diff_id=sha256(tar), gzip=True)
    with pytest.raises((TruncatedLayerError, zlib.error)):
        read_all(reader)


# -- whole pulls into directories -------------------------------------------------------------


@dataclass
class DirContainerd(FakeContainerd):
    """Active snapshots are directories, handed out as containerd's overlayfs would: a bind
    mount without a parent, an overlay's upper directory with one."""

    root: Path = Path("/nonexistent")
    dirs: dict[str, Path] = field(default_factory=dict)

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        super().prepare_snapshot(snapshotter, key, parent, labels)
        directory = self.root / str(len(self.prepares))
        directory.mkdir(parents=True)
        self.dirs[key] = directory
        if not parent:
            return [Mount("bind", str(directory), ("rw", "rbind"))]
        lower = self.dirs[parent]
        work = directory.with_name(directory.name + "-work")
        return [Mount("overlay", "overlay", (f"lowerdir={lower}", f"upperdir={directory}",
                                             f"workdir={work}"))]

    def commit_snapshot(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]
    ) -> None:
        super().commit_snapshot(snapshotter, name, key, labels)
        self.dirs[name] = self.dirs.pop(key)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        super().remove_snapshot(snapshotter, key)
        self.dirs.pop(key, None)


def image_of(tars: list[bytes]) -> Image:
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    diff_ids = [sha256(t) for t in tars]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    layers = tuple(Descriptor(GZ, sha256(b), len(b)) for b in blobs)
    config_desc = Descriptor("application/vnd.oci.image.config.v1+json", sha256(config),
                             len(config))
    manifest = Manifest(OCI_MANIFEST, config_desc, layers)
    manifest_bytes = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_desc.media_type, "digest": config_desc.digest,
                   "size": config_desc.size},
        "layers": [{"mediaType": GZ, "digest": d.digest, "size": d.size} for d in layers],
    }).encode()
    return Image(blobs, diff_ids, manifest, manifest_bytes, config)


def parallel_pull(registry: FakeRegistry, containerd: FakeContainerd) -> list[LayerResult]:
    return pull_results(registry, containerd, NoProgress(), parallel=SMALL)


def two_layers() -> Image:
    return image_of([
        tar_of({"etc/one": os.urandom(2500), "etc/keep": b"kept"}),
        tar_of({"etc/two": os.urandom(3500)}),
    ])


def test_parallel_pull_unpacks_into_the_snapshots_and_stores_the_blobs(tmp_path: Path) -> None:
    image = two_layers()
    registry = registry_with(image)
    containerd = DirContainerd(root=tmp_path / "snapshots")
    results = parallel_pull(registry, containerd)

    assert [r.outcome for r in results] == ["applied", "applied"]
    bottom, top = (containerd.dirs[chain] for chain in image.chains)
    assert sorted(os.listdir(bottom / "etc")) == ["keep", "one"]
    assert os.listdir(top / "etc") == ["two"]  # the upper directory holds only its layer
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(image.blobs[1]))) as tar:
        expected = tar.extractfile("etc/two")
        assert expected is not None
        assert (top / "etc/two").read_bytes() == expected.read()
    for blob in image.blobs:  # in containerd's content store, as after any pull
        assert containerd.content[sha256(blob)] == blob
    ranged = [r for r in registry.requests if r.headers.get("range")]
    assert len(ranged) >= math.ceil(len(image.blobs[0]) / SMALL.range_size)
    assert containerd.open_leases == []


def test_parallel_pull_from_a_registry_without_ranges(tmp_path: Path) -> None:
    image = two_layers()
    registry = registry_with(image, ranges=False)
    containerd = DirContainerd(root=tmp_path / "snapshots")
    results = parallel_pull(registry, containerd)
    assert [r.outcome for r in results] == ["applied", "applied"]
    assert (containerd.dirs[image.chains[1]] / "etc/two").stat().st_size == 3500
    for blob in image.blobs:
        assert containerd.content[sha256(blob)] == blob


def test_a_blob_that_does_not_match_its_digest_commits_nothing(tmp_path: Path) -> None:
    image = two_layers()
    registry = registry_with(image)
    corrupt = bytearray(image.blobs[1])
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size: only the digest can tell
    registry.blobs[sha256(image.blobs[1])] = bytes(corrupt)
    containerd = DirContainerd(root=tmp_path / "snapshots")
    with pytest.raises(Exception):  # noqa: B017 - zlib's CRC or the digest check: either stops it
        parallel_pull(registry, containerd)
    assert image.chains[1] not in containerd.snapshots
    assert sha256(image.blobs[1]) not in containerd.content
    assert all(s.kind.name == "COMMITTED" for s in containerd.snapshots.values())
    assert containerd.images == {}


def test_a_tar_that_does_not_match_the_config_commits_no_snapshot(tmp_path: Path) -> None:
    image = two_layers()
    wrong = image_of([tar_of({"etc/one": b"1"}), tar_of({"etc/two": b"2"})])
    image.diff_ids[1] = wrong.diff_ids[1]
    image.config = json.dumps({"rootfs": {"type": "layers", "diff_ids": image.diff_ids}}).encode()
    config_desc = Descriptor("application/vnd.oci.image.config.v1+json", sha256(image.config),
                             len(image.config))
    document = json.loads(image.manifest_bytes)
    document["config"]["digest"], document["config"]["size"] = config_desc.digest, config_desc.size
    image.manifest_bytes = json.dumps(document).encode()
    registry = registry_with(image)
    containerd = DirContainerd(root=tmp_path / "snapshots")
    with pytest.raises(LayerDigestError, match="image config"):
        parallel_pull(registry, containerd)
    assert image.chains[1] not in containerd.snapshots
    assert all(s.kind.name == "COMMITTED" for s in containerd.snapshots.values())
    assert containerd.images == {}


def test_a_truncated_download_commits_nothing(tmp_path: Path) -> None:
    image = two_layers()
    registry = registry_with(image)
    digest = sha256(image.blobs[0])
    registry.blobs[digest] = image.blobs[0][:-50]  # the registry lost the end of the blob
    containerd = DirContainerd(root=tmp_path / "snapshots")
    with pytest.raises(Exception):  # noqa: B017 - the registry client's range error
        parallel_pull(registry, containerd)
    assert containerd.snapshots == {}
    assert digest not in containerd.content


def test_a_layer_through_a_symlinked_directory_is_applied_by_containerd(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("lib")
        link.type, link.linkname = tarfile.SYMTYPE, "usr/lib"
        tar.addfile(link)
        info = tarfile.TarInfo("lib/x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    image = image_of([buffer.getvalue()])
    containerd = DirContainerd(root=tmp_path / "snapshots")
    results = parallel_pull(registry_with(image), containerd)
    assert [r.outcome for r in results] == ["applied"]
    # The fake diff service applied it: the direct path's partial snapshot was removed first.
    assert any(call[0] == f"apply {sha256(image.blobs[0])}" for call in containerd.calls)
    assert len(containerd.prepares) == 2
    assert list(containerd.snapshots) == [image.chains[0]]


# -- the command's choice ----------------------------------------------------------------------


def pull_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pull_command.add_arguments(parser)
    return parser.parse_args(["reg.test/app:1", *argv])


def test_parallel_is_the_default_and_the_flag_wins_over_the_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert pull_command.parallel_settings(pull_args("--config", str(empty))) == FetchSettings()
    assert pull_command.parallel_settings(
        pull_args("--config", str(empty), "--no-parallel")) is None
    off = tmp_path / "off.toml"
    off.write_text("[pull]\nparallel = false\nconnections = 2\nrange_size = 65536\n")
    assert pull_command.parallel_settings(pull_args("--config", str(off))) is None
    assert pull_command.parallel_settings(pull_args("--config", str(off), "--parallel")) == \
        FetchSettings(connections=2, range_size=65536)
