"""The remote-snapshot path over the daemon's real gRPC socket: labelled Prepares of eStargz and
zstd:chunked layers from the real registry are served lazily over FUSE, committed under the
chain ID and answered ALREADY_EXISTS, exactly as containerd's unpacker expects; containers'
overlay mounts read them; restarts re-attach them without the registry."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from snapshotter._proto import snapshots_pb2
from snapshotter.labels import (
    ANNOTATION_LABEL_PREFIX,
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    REMOTE,
    REMOTE_VALUE,
    SNAPSHOT_REF,
)
from tests.support import oci_image as oci
from tests.support.daemon import Daemon, running_daemon
from tests.support.docker_registry import RunningRegistry

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.registry, pytest.mark.slow]

EXTRA = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40_000))  # 1.25 MiB


@dataclass(frozen=True)
class LazyImage:
    reference: str
    manifest_digest: str
    layers: tuple[oci.Layer, ...]
    chain: tuple[str, ...]
    plain_tars: tuple[bytes, ...]


def _chain_ids(diff_ids: list[str]) -> tuple[str, ...]:
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            chain.append(oci.sha256(f"{chain[-1]} {diff_id}".encode()))
    return tuple(chain)


@pytest.fixture(scope="session")
def lazy_image(
    docker_registry: RunningRegistry, tmp_path_factory: pytest.TempPathFactory
) -> LazyImage:
    """Layer 1: busybox as eStargz. Layer 2: zstd:chunked with a 1.25 MiB file and a
    whiteout. Layer 3: plain gzip (not lazily servable)."""
    tars = (
        oci.busybox_tar(),
        oci.TarBuilder().dir("etc").file("etc/hello", b"hello from zstd:chunked\n")
        .dir("data").file("data/big", EXTRA).whiteout("etc/passwd").tar(),
        oci.TarBuilder().dir("etc").file("etc/plain", b"plain gzip layer\n").tar(),
    )
    layers = (
        oci.seekable_layer(tars[0], "estargz", chunk_size=64 << 10),
        oci.seekable_layer(tars[1], "zstd:chunked", chunk_size=256 << 10),
        oci.gzip_layer(tars[2]),
    )
    layout = tmp_path_factory.mktemp("lazy-layout")
    digest = oci.write_layout(layout, layers)
    reference = f"{docker_registry.host}/test/lazy:latest"
    oci.push_layout(layout, "latest", reference)
    chain = _chain_ids([layer.diff_id for layer in layers])
    return LazyImage(reference, digest, layers, chain, tars)


def _labels(image: LazyImage, index: int, *, forward_annotations: bool = True) -> dict[str, str]:
    """What containerd's unpacker (CRI) or lazysnap's own unpacker sends for layer ``index``."""
    layer = image.layers[index]
    labels = {
        SNAPSHOT_REF: image.chain[index],
        CRI_IMAGE_REF: image.reference,
        CRI_LAYER_DIGEST: layer.digest,
        CRI_MANIFEST_DIGEST: image.manifest_digest,
        CRI_IMAGE_LAYERS: ",".join(x.digest for x in image.layers[index:]),
    }
    for key, value in layer.annotations:
        if key.startswith("containerd.io/snapshot/"):
            labels[key] = value  # containerd's own filter lets these through
        elif forward_annotations:
            labels[ANNOTATION_LABEL_PREFIX + key] = value
    return labels


def _prepare(daemon: Daemon, key: str, parent: str, labels: dict[str, str]) -> list[object]:
    with daemon.snapshots() as stub:
        reply = stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)
        )
    return list(reply.mounts)


def _expect_remote(daemon: Daemon, image: LazyImage, index: int, parent: str) -> None:
    try:
        _prepare(daemon, f"ns/{index}/extract-{index} {image.chain[index]}", parent,
                 _labels(image, index))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc.details()
    else:
        pytest.fail(f"layer {index} was not served lazily:\n{daemon.log()[-4000:]}")


def _stat(daemon: Daemon, key: str) -> snapshots_pb2.Info:
    with daemon.snapshots() as stub:
        return stub.Stat(snapshots_pb2.StatSnapshotRequest(key=key)).info


def _containerd_lookup(daemon: Daemon, chain_id: str, parent: str) -> list[snapshots_pb2.Info]:
    """The List containerd's metadata layer makes after ALREADY_EXISTS."""
    query = f'labels."containerd.io/snapshot.ref"=={chain_id},parent=="{parent}"'
    with daemon.snapshots() as stub:
        replies = stub.List(snapshots_pb2.ListSnapshotsRequest(filters=[query]))
        return [info for reply in replies for info in reply.info]


@pytest.fixture
def mounted(short_tmp: Path) -> Iterator[list[Path]]:
    targets: list[Path] = []
    yield targets
    for target in reversed(targets):
        subprocess.run(["umount", "-l", str(target)], check=False)


def _mount(mounts: list[object], target: Path, registry: list[Path]) -> None:
    assert len(mounts) == 1
    mount = mounts[0]
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", mount.type, "-o", ",".join(mount.options), mount.source, str(target)],  # type: ignore[attr-defined]
        check=True, timeout=30,
    )
    registry.append(target)


def _unmount(target: Path, registry: list[Path]) -> None:
    subprocess.run(["umount", str(target)], check=True, timeout=30)
    registry.remove(target)


def _prepare_all_lazily(daemon: Daemon, image: LazyImage) -> None:
    _expect_remote(daemon, image, 0, "")
    _expect_remote(daemon, image, 1, image.chain[0])


def test_lazy_layers_are_committed_under_the_chain_id(
    short_tmp: Path, lazy_image: LazyImage
) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        base, second = _stat(daemon, lazy_image.chain[0]), _stat(daemon, lazy_image.chain[1])
        for info, parent in ((base, ""), (second, lazy_image.chain[0])):
            assert info.kind == snapshots_pb2.COMMITTED and info.parent == parent
            assert info.labels[REMOTE] == REMOTE_VALUE
            assert _containerd_lookup(daemon, info.name, parent)[0].name == info.name
        assert "remote-snapshot-prepared=true" in daemon.log()
        # A repeated Prepare for the same chain is answered at once, without a second attach.
        _expect_remote(daemon, lazy_image, 0, "")
        assert daemon.log().count("remote layer attached") == 2


def test_container_reads_lazy_layers_through_overlay(
    short_tmp: Path, lazy_image: LazyImage, mounted: list[Path]
) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        mounts = _prepare(daemon, "container", lazy_image.chain[1], {})
        lowerdir = next(o for o in mounts[0].options if o.startswith("lowerdir="))  # type: ignore[attr-defined]
        assert "/fuse/" in lowerdir
        root = short_tmp / "rootfs"
        _mount(mounts, root, mounted)
        assert (root / "bin/busybox").read_bytes() == oci.BUSYBOX.read_bytes()
        assert (root / "etc/hello").read_text() == "hello from zstd:chunked\n"
        assert (root / "data/big").read_bytes() == EXTRA
        assert not (root / "etc/passwd").exists(), "the zstd:chunked layer's whiteout applies"
        assert (root / "bin/sh").is_symlink() and (root / "bin/sh").readlink() == Path("busybox")
        (root / "etc/new").write_text("written by the container")  # the upper dir is local
        assert (root / "etc/new").read_text() == "written by the container"
        with daemon.snapshots() as stub:
            usage = stub.Usage(snapshots_pb2.UsageRequest(key=lazy_image.chain[1]))
        assert usage.size >= len(EXTRA), "Usage reports the lazily cached bytes"


def test_restart_and_kill9_reattach_without_the_registry(
    short_tmp: Path, lazy_image: LazyImage, mounted: list[Path]
) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        daemon.stop()
        daemon.start()
        assert daemon.log().count("remote layer restored") == 2
        mounts = _prepare(daemon, "after-restart", lazy_image.chain[1], {})
        _mount(mounts, short_tmp / "r1", mounted)
        assert (short_tmp / "r1/etc/hello").read_text() == "hello from zstd:chunked\n"
        _unmount(short_tmp / "r1", mounted)
        daemon.kill9()  # leaves a dead FUSE mount behind
        daemon.start()
        mounts = _prepare(daemon, "after-kill", lazy_image.chain[1], {})
        _mount(mounts, short_tmp / "r2", mounted)
        assert (short_tmp / "r2/bin/busybox").read_bytes() == oci.BUSYBOX.read_bytes()


def test_unservable_layers_fall_back_to_ordinary_snapshots(
    short_tmp: Path, lazy_image: LazyImage, docker_registry: RunningRegistry
) -> None:
    def manifest_gets() -> int:
        return sum(
            1 for line in docker_registry.log().splitlines()
            if "http.request.method=GET" in line
            and f"/manifests/{lazy_image.manifest_digest}" in line
        )

    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        # A plain gzip layer: the labels carry no TOC, the manifest says gzip: containerd applies.
        before = manifest_gets()
        mounts = _prepare(daemon, "extract-plain", lazy_image.chain[1], _labels(lazy_image, 2))
        assert mounts and mounts[0].type == "overlay"  # type: ignore[attr-defined]
        assert "remote-snapshot-prepared=false" in daemon.log()
        assert manifest_gets() == before + 1
        # The manifest of an image is fetched once for all of its layers' Prepares.
        _prepare(daemon, "extract-plain-again", lazy_image.chain[1], _labels(lazy_image, 2))
        assert manifest_gets() == before + 1
        # Labels without the image reference (snapshot annotations disabled): no network tried.
        labels = {SNAPSHOT_REF: "sha256:" + "1" * 64}
        assert _prepare(daemon, "extract-nolabels", "", labels)
        assert "no cri.image-ref" in daemon.log()


def test_unreachable_registry_falls_back_quickly(short_tmp: Path, lazy_image: LazyImage) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        labels = _labels(lazy_image, 0)
        labels[CRI_IMAGE_REF] = "127.0.0.1:9/test/lazy:latest"  # nothing listens on port 9
        mounts = _prepare(daemon, "extract-unreachable", "", labels)
        assert mounts[0].type == "bind"  # type: ignore[attr-defined]
        assert "remote-snapshot-prepared=false" in daemon.log()


def test_remove_detaches_the_layer(short_tmp: Path, lazy_image: LazyImage) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        fuse_root = daemon.root / "fuse"
        assert len(daemon.listed_layers(2)) == 2
        with daemon.snapshots() as stub:
            stub.Remove(snapshots_pb2.RemoveSnapshotRequest(key=lazy_image.chain[1]))
            stub.Remove(snapshots_pb2.RemoveSnapshotRequest(key=lazy_image.chain[0]))
        assert list(fuse_root.iterdir()) == []
        assert list((daemon.root / "tails").iterdir()) == []


def test_cleanup_removes_orphans_but_keeps_live_layers(
    short_tmp: Path, lazy_image: LazyImage
) -> None:
    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        tails = daemon.root / "tails"
        live = sorted(p.name for p in tails.iterdir())
        # What a daemon killed between attach and its transaction leaves behind.
        (tails / "rdeadbeef0000.tail").write_bytes(b"orphan")
        (daemon.root / "l" / "zzzz").symlink_to("../fuse/rdeadbeef0000")
        with daemon.snapshots() as stub:
            stub.Cleanup(snapshots_pb2.CleanupRequest())
        assert sorted(p.name for p in tails.iterdir()) == live
        assert not (daemon.root / "l" / "zzzz").is_symlink()
        assert _stat(daemon, lazy_image.chain[1]).labels[REMOTE] == REMOTE_VALUE


def _usage(daemon: Daemon, key: str) -> int:
    with daemon.snapshots() as stub:
        return int(stub.Usage(snapshots_pb2.UsageRequest(key=key)).size)


def _cache_files(daemon: Daemon) -> dict[str, int]:
    return {
        p.name: p.stat().st_size for p in (daemon.root / "cache").rglob("*")
        if p.is_file() and not p.name.startswith(".tmp-")
    }


def test_cleanup_collects_the_chunks_of_removed_layers(
    short_tmp: Path, lazy_image: LazyImage
) -> None:
    passwd, hello = b"root:x:0:0:root:/root:/bin/sh\n", b"hello from zstd:chunked\n"
    base_bytes = len(oci.BUSYBOX.read_bytes()) + len(passwd)
    top_bytes = len(hello) + len(EXTRA)
    passwd_key = "sha256-" + hashlib.sha256(passwd).hexdigest()
    hello_key = "sha256-" + hashlib.sha256(hello).hexdigest()
    with running_daemon(short_tmp / "d") as daemon:
        _prepare_all_lazily(daemon, lazy_image)
        base, top = lazy_image.chain[0], lazy_image.chain[1]
        # Background fetch brings both layers into the cache; Usage reports it as it goes.
        deadline = time.monotonic() + 60
        while (_usage(daemon, base), _usage(daemon, top)) != (base_bytes, top_bytes):
            assert time.monotonic() < deadline, daemon.log()[-4000:]
            time.sleep(0.1)
        before = _cache_files(daemon)
        assert {passwd_key, hello_key} <= set(before)

        with daemon.snapshots() as stub:
            stub.Remove(snapshots_pb2.RemoveSnapshotRequest(key=top))
            stub.Cleanup(snapshots_pb2.CleanupRequest())
        after = _cache_files(daemon)
        assert hello_key not in after and passwd_key in after
        assert set(after) < set(before)
        assert sum(before.values()) - sum(after.values()) == top_bytes
        assert f"cache garbage collected chunks={len(before) - len(after)} " in daemon.log()
        # The remaining layer keeps its chunks: same Usage, and it reads without the registry.
        assert _usage(daemon, base) == base_bytes
        (layer_dir,) = list((daemon.root / "fuse").iterdir())
        assert (layer_dir / "bin/busybox").read_bytes() == oci.BUSYBOX.read_bytes()
        assert _cache_files(daemon) == after
        with daemon.snapshots() as stub:
            stub.Cleanup(snapshots_pb2.CleanupRequest())
        assert _cache_files(daemon) == after


def test_a_removed_layers_slot_is_never_given_to_another_layer(
    short_tmp: Path, lazy_image: LazyImage
) -> None:
    """The kernel may still hold inode numbers of a removed layer: a different layer must never
    get them, in the same daemon or in one that took the FUSE connection over after a crash."""
    with running_daemon(short_tmp / "d") as daemon:
        fuse_root = daemon.root / "fuse"
        slots_seen: set[int] = set()

        def check_layer(path: str, expected: bytes) -> None:
            (layer,) = daemon.listed_layers(1)
            target = layer / path
            before = target.stat()
            assert target.read_bytes() == expected
            assert before.st_size == len(expected)
            slot = before.st_ino >> 32
            assert slot not in slots_seen, f"slot {slot} handed out again"
            slots_seen.add(slot)

        def remove(index: int) -> None:
            with daemon.snapshots() as stub:
                stub.Remove(snapshots_pb2.RemoveSnapshotRequest(key=lazy_image.chain[index]))
            assert list(fuse_root.iterdir()) == []

        _expect_remote(daemon, lazy_image, 0, "")
        check_layer("bin/busybox", oci.BUSYBOX.read_bytes())
        remove(0)
        _expect_remote(daemon, lazy_image, 1, "")
        check_layer("etc/hello", b"hello from zstd:chunked\n")
        remove(1)
        daemon.kill9()  # the fuse keeper holds the connection; the next daemon takes it over
        daemon.start()
        assert "fuse connection taken over" in daemon.log()
        _expect_remote(daemon, lazy_image, 0, "")
        check_layer("bin/busybox", oci.BUSYBOX.read_bytes())
        _expect_remote(daemon, lazy_image, 1, lazy_image.chain[0])
        assert len(daemon.listed_layers(2)) == 2
