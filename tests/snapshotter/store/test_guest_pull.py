"""Kata guest-pull mode in the store: the volume passes Kata's rules, the mount has Kata's shape.

Kata's rules are ported in ``kata_rules`` (each with its source named); the tests check the
store's output against them, and check the port itself on volumes Kata is known to refuse.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExistsError
from snapshotter.labels import (
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    KATA_GUEST_PULL,
    SNAPSHOT_REF,
)
from snapshotter.model import Kind, Mount
from snapshotter.store.guest_pull import (
    PLACEHOLDER_SOURCE,
    VOLUME_OPTION,
    GuestPull,
    VolumeError,
    encode_volume,
    mount_type,
    parse_volume,
)
from snapshotter.store.layout import Layout
from snapshotter.store.mounts import MOUNT_OPTIONS_BUDGET, LowerDir, guest_pull_mount
from snapshotter.store.remote import AttachedLayer
from snapshotter.store.snapshots import Snapshotter
from tests.snapshotter.store.kata_rules import (
    KataRejects,
    is_nydus_rootfs_type,
    kata_accepts,
)

HELPER = "/usr/local/bin/nydus-overlayfs-lazysnap"
IMAGE = "registry.example/app:1"
MANIFEST = "sha256:" + "m" * 64


def b64(document: object) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


class FakeRemote:
    """Every layer is served lazily (the store only records what ``mount`` answers)."""

    def __init__(self) -> None:
        self.slots = 0

    def mount(self, labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        self.slots += 1
        return AttachedLayer(layer_id, self.slots, labels.get(CRI_IMAGE_REF, ""),
                             labels.get(CRI_LAYER_DIGEST, ""), 1, "", {}, "estargz")

    def unmount(self, layer_id: str) -> None:
        pass

    def cached_bytes(self, layer_id: str) -> int:
        return 0

    def collect_garbage(self, recorded: Mapping[str, str], attaching: Collection[str]) -> None:
        pass


def layer_labels(chain_id: str, image: str | None = IMAGE) -> dict[str, str]:
    labels = {SNAPSHOT_REF: chain_id, CRI_LAYER_DIGEST: "sha256:" + chain_id[-64:],
              CRI_MANIFEST_DIGEST: MANIFEST}
    if image:
        labels[CRI_IMAGE_REF] = image
    return labels


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Snapshotter]:
    sn = Snapshotter(tmp_path / "root", guest_pull=GuestPull(mount_type(HELPER)))
    sn.enable_remote(FakeRemote())
    yield sn
    sn.close()


def pull_lazily(sn: Snapshotter, layers: int, image: str | None = IMAGE) -> str:
    parent = ""
    for i in range(layers):
        chain_id = f"sha256:{i:064d}"
        with pytest.raises(AlreadyExistsError):
            sn.prepare(f"ns/1/extract-{i} {chain_id}", parent, layer_labels(chain_id, image))
        parent = chain_id
    return parent


def the_volume(mount: Mount) -> str:
    (volume,) = [o[len(VOLUME_OPTION):] for o in mount.options if o.startswith(VOLUME_OPTION)]
    return volume


def option(mount: Mount, name: str) -> str:
    (value,) = [o.split("=", 1)[1] for o in mount.options if o.startswith(name + "=")]
    return value


# -- the port of Kata's rules refuses what Kata refuses -----------------------------------------


@pytest.mark.parametrize("volume, reason", [
    ("not base64!", "base64"),
    (base64.b64encode(b"{").decode(), "json"),
    (b64({"source": IMAGE}), "volume_type"),
    (b64({"volume_type": "image_guest_pull", "source": IMAGE, "image_pull": {}}), "nil"),
    (b64({"volume_type": "image_guest_pull", "source": IMAGE,
          "image_pull": {"metadata": None}}), "nil"),
    (b64({"volume_type": "image_guest_pull", "source": IMAGE, "options": "a=b"}), "options"),
    (b64({"volume_type": "image_guest_pull", "image_pull": {"metadata": {}}}), "reference"),
    (b64({"volume_type": "image_guest_pull", "source": IMAGE}), "nil map"),
])
def test_the_port_of_kata_rules_refuses_what_kata_refuses(volume: str, reason: str) -> None:
    with pytest.raises(KataRejects, match=reason):
        kata_accepts(volume)


def test_the_port_of_kata_rules_accepts_what_nydus_proxy_mode_writes() -> None:
    # nydus-snapshotter snapshot/mount_option.go (mountWithProxyVolume): the labels become the
    # options as key=value and the image_pull metadata; a missing image ref a dummy source.
    volume = kata_accepts(b64({"volume_type": "image_guest_pull",
                               "source": "dummy-image-reference",
                               "options": ["a=b"], "image_pull": {"metadata": {"a": "b"}}}))
    assert volume["source"] == "dummy-image-reference"


def test_kata_shim_type_check() -> None:
    assert is_nydus_rootfs_type("fuse.nydus-overlayfs")
    assert is_nydus_rootfs_type("fuse./usr/local/bin/nydus-overlayfs-lazysnap")
    assert not is_nydus_rootfs_type("overlay")
    assert not is_nydus_rootfs_type("fuse3.nydus-overlayfs")
    assert not is_nydus_rootfs_type("fuse./opt/nydus-overlayfs/lazysnap-helper")


# -- what lazysnap writes -------------------------------------------------------------------


def test_encoded_volume_passes_kata_and_names_the_image() -> None:
    volume = kata_accepts(encode_volume(IMAGE, {CRI_IMAGE_REF: IMAGE}))
    assert volume["volume_type"] == "image_guest_pull"
    assert volume["source"] == IMAGE
    assert volume["options"] == [f"{CRI_IMAGE_REF}={IMAGE}"]
    assert volume["image_pull"] == {"metadata": {CRI_IMAGE_REF: IMAGE}}


def test_empty_metadata_is_still_an_object_and_an_empty_source_is_the_placeholder() -> None:
    encoded = encode_volume("", {})
    assert json.loads(base64.b64decode(encoded))["image_pull"] == {"metadata": {}}
    assert kata_accepts(encoded)["source"] == PLACEHOLDER_SOURCE


@pytest.mark.parametrize("volume", [
    "not base64!",
    b64({"source": IMAGE}),
    b64({"volume_type": "image_guest_pull", "source": IMAGE, "image_pull": {}}),
    b64({"volume_type": "image_guest_pull", "image_pull": {"metadata": {}}}),
    b64({"volume_type": "image_guest_pull", "source": IMAGE}),
    b64(["image_guest_pull"]),
])
def test_parse_volume_refuses_what_kata_refuses(volume: str) -> None:
    with pytest.raises(KataRejects):
        kata_accepts(volume)
    with pytest.raises(VolumeError):
        parse_volume(volume)


@pytest.mark.parametrize("helper", ["/usr/bin/lazysnap-mount", "overlay", "/opt/nydus-overlayfs/x"])
def test_mount_type_refuses_names_kata_would_not_recognise(helper: str) -> None:
    with pytest.raises(ValueError, match="nydus-overlayfs"):
        mount_type(helper)


# -- the mount shape ------------------------------------------------------------------------


def test_container_snapshot_is_one_kata_mount_naming_the_image(store: Snapshotter) -> None:
    top = pull_lazily(store, 3)
    (mount,) = store.prepare("ns/1/container", top, {})
    assert is_nydus_rootfs_type(mount.type) and mount.type == "fuse." + HELPER
    assert mount.source == "overlay"
    assert [o.split("=", 1)[0] for o in mount.options] == [
        "index", "workdir", "upperdir", "lowerdir", "io.katacontainers.volume"]
    assert len(option(mount, "lowerdir").split(":")) == 3
    volume = kata_accepts(the_volume(mount))
    assert volume["source"] == IMAGE
    assert volume["image_pull"]["metadata"] == {CRI_IMAGE_REF: IMAGE, CRI_MANIFEST_DIGEST: MANIFEST}
    assert store.mounts("ns/1/container") == [mount]
    assert store.stat(top).labels[KATA_GUEST_PULL] == "true"
    assert store.guest_pull == GuestPull("fuse." + HELPER)


def test_views_are_kata_mounts_too_and_one_parent_gets_an_empty_second_lower(
    store: Snapshotter,
) -> None:
    top = pull_lazily(store, 1)
    (mount,) = store.view("ns/1/view", top, {})
    assert is_nydus_rootfs_type(mount.type)
    lowers = option(mount, "lowerdir").split(":")
    assert len(lowers) == 2
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in mount.options)
    own = Path(lowers[1])
    assert own.is_dir() and not any(own.iterdir())  # the view's own, empty, directory
    kata_accepts(the_volume(mount))


def test_chain_made_elsewhere_gets_the_placeholder_source(tmp_path: Path) -> None:
    # Layers unpacked the ordinary way (no lazy side) carry no guest-pull mark.
    sn = Snapshotter(tmp_path / "root", guest_pull=GuestPull(mount_type(HELPER)))
    try:
        sn.prepare("extract", "", {})
        sn.commit("base", "extract", {})
        (mount,) = sn.prepare("container", "base", {})
        assert is_nydus_rootfs_type(mount.type)
        volume = kata_accepts(the_volume(mount))
        assert volume["source"] == PLACEHOLDER_SOURCE
        assert volume["image_pull"] == {"metadata": {}}
    finally:
        sn.close()


def test_layer_without_image_reference_gets_the_placeholder_source(store: Snapshotter) -> None:
    top = pull_lazily(store, 2, image=None)
    (mount,) = store.prepare("ns/1/container", top, {})
    assert kata_accepts(the_volume(mount))["source"] == PLACEHOLDER_SOURCE


def test_layers_being_unpacked_keep_the_plain_overlay(tmp_path: Path) -> None:
    # No lazy side: containerd unpacks the second layer into an active snapshot over the first.
    sn = Snapshotter(tmp_path / "root", guest_pull=GuestPull(mount_type(HELPER)))
    try:
        sn.prepare("extract-1", "", {})
        sn.commit("layer-1", "extract-1", {})
        (mount,) = sn.prepare("extract-2", "layer-1", {SNAPSHOT_REF: "layer-2"})
        assert mount.type == "overlay"
        (mount,) = sn.prepare("no-parent", "", {})
        assert mount.type == "bind"  # nothing for a guest to pull
    finally:
        sn.close()


def test_mode_off_keeps_the_plain_overlay_and_marks_nothing(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root")
    sn.enable_remote(FakeRemote())
    try:
        top = pull_lazily(sn, 2)
        (mount,) = sn.prepare("ns/1/container", top, {})
        assert mount.type == "overlay"
        assert KATA_GUEST_PULL not in sn.stat(top).labels
    finally:
        sn.close()


def test_128_layers_fit_a_page_once_the_volume_is_dropped() -> None:
    layout = Layout(Path("/var/lib/lazysnap"))
    parents = [LowerDir(layout.remote_dir(f"r{i:012x}"), layout.link(i)) for i in range(128)]
    own = LowerDir(layout.fs_dir(500), layout.link(500))
    mount = guest_pull_mount(Kind.ACTIVE, own, layout.work_dir(500), parents,
                             mount_type(HELPER), encode_volume(IMAGE, {CRI_IMAGE_REF: IMAGE}))
    overlay = [o for o in mount.options if not o.startswith(VOLUME_OPTION)]
    assert len(",".join(overlay)) <= MOUNT_OPTIONS_BUDGET
    assert option(mount, "lowerdir").split(":")[0] == str(layout.link(0))
