"""The host mount helper of Kata guest-pull mode: what it refuses, what it hands to mount(8).

Its argv is what fuse3's mount.fuse passes on (checked on this machine, docs/kata.md): the
source, the target, then ``-o`` with every option joined by commas and ``dev,suid`` added.
"""

from __future__ import annotations

import base64
import json

import pytest

from snapshotter.kata.helper import OptionsError, compacted, main, parse_arguments
from snapshotter.labels import CRI_IMAGE_REF
from snapshotter.store.guest_pull import VOLUME_OPTION, encode_volume
from snapshotter.store.mounts import MOUNT_OPTIONS_BUDGET

VOLUME = VOLUME_OPTION + encode_volume("registry.example/app:1", {CRI_IMAGE_REF: "x"})
LOWERS = "lowerdir=/s/l/3:/s/l/2"
RW = f"index=off,workdir=/s/9/work,upperdir=/s/9/fs,{LOWERS},{VOLUME},dev,suid"


def b64(document: object) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def test_what_mount_fuse_passes_becomes_the_overlay_without_the_volume() -> None:
    mount = parse_arguments(["overlay", "/run/rootfs", "-o", RW])
    data, cwd = compacted(mount)
    assert data == ("index=off,dev,suid,lowerdir=/s/l/3:/s/l/2,"
                    "upperdir=/s/9/fs,workdir=/s/9/work")
    assert cwd is None
    assert mount.target == "/run/rootfs"


def test_read_only_mount_puts_the_upper_directory_on_top_of_the_lowers() -> None:
    # containerd's read-only temporary mount (resolving a named user) appends "ro".
    mount = parse_arguments(["overlay", "/tmp/m", "-o", RW + ",ro"])
    assert mount.lowers == ("/s/9/fs", "/s/l/3", "/s/l/2")
    assert (mount.upper, mount.work) == (None, None)
    assert "upperdir" not in compacted(mount)[0]


def test_lowers_over_a_page_are_named_from_their_common_directory() -> None:
    lowers = ":".join(f"/var/lib/a-long-state-root/for-lazysnap/l/{i:x}" for i in range(128))
    mount = parse_arguments(["overlay", "/t", "-o", f"lowerdir={lowers},{VOLUME}"])
    data, cwd = compacted(mount)
    assert cwd == "/var/lib/a-long-state-root/for-lazysnap/l"
    assert len(data) <= MOUNT_OPTIONS_BUDGET
    assert data.endswith("lowerdir=" + ":".join(f"{i:x}" for i in range(128)))


@pytest.mark.parametrize("argv, reason", [
    (["overlay", "/t", "-o", RW.replace(VOLUME + ",", "")], "expected one io.katacontainers"),
    (["overlay", "/t", "-o", f"{RW},{VOLUME}"], "got 2"),
    (["overlay", "/t", "-o", RW.replace(VOLUME, VOLUME_OPTION + "%%%")], "base64"),
    (["overlay", "/t", "-o", RW.replace(VOLUME, VOLUME_OPTION + b64({"volume_type": "x"}))],
     "not 'image_guest_pull'"),
    (["overlay", "/t", "-o", RW.replace(VOLUME, VOLUME_OPTION + b64(
        {"volume_type": "image_guest_pull", "image_pull": {"metadata": {}}}))], "source"),
    (["overlay", "/t", "-o", RW.replace(VOLUME, VOLUME_OPTION + b64(
        {"volume_type": "image_guest_pull", "source": "a", "image_pull": {}}))], "metadata"),
    (["overlay", "/t", "-o", RW.replace(LOWERS + ",", "")], "no lowerdir"),
    (["overlay", "/t", "-o", RW.replace("/s/l/2", "s/l/2")], "not an absolute path"),
    (["overlay", "/t", "-o", RW.replace("/s/l/2", "")], "not an absolute path"),
    (["overlay", "/t", "-o", RW.replace("workdir=/s/9/work,", "")], "go together"),
    (["overlay", "/t", "-o", f"{RW},upperdir=/x"], "twice"),
    (["overlay", "/t", "-o", RW.replace(",dev", ",,dev")], "empty option"),
    (["overlay", "/t", "-o", f"lowerdir=/s/l/3,{VOLUME}"], "two lower"),
    (["/dev/sda", "/t", "-o", RW], "source must be 'overlay'"),
    (["overlay", "-o", RW], "a source and a target"),
    (["overlay", "/t", "/u", "-o", RW], "a source and a target"),
    (["overlay", "/t", "-o"], "-o needs a value"),
    (["overlay", "/t", "-x", "-o", RW], "unknown flag"),
])
def test_malformed_options_are_refused_with_the_reason(argv: list[str], reason: str) -> None:
    with pytest.raises(OptionsError, match=reason):
        parse_arguments(argv)


def test_refusal_is_a_clear_error_and_no_mount(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_mount(*args: object, **kwargs: object) -> None:
        raise AssertionError("mount(8) must not run")

    monkeypatch.setattr("subprocess.run", no_mount)
    assert main(["overlay", "/t", "-o", RW.replace(LOWERS + ",", "")]) == 1
    err = capsys.readouterr().err
    assert "nydus-overlayfs-lazysnap: refusing the mount: no lowerdir" in err
    assert "usage:" in err
