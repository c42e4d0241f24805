"""What the lazy end-to-end tests (converted images, SOCI-indexed gzip images) set up alike: a
test image's files, the container that reads everything, what an overlayfs pull shows it, and
a lazysnap daemon with containerd 1.6 in front of it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support import oci_image as oci
from tests.support.containerd import RunningContainerd, containerd_available, run_containerd
from tests.support.daemon import Daemon, running_daemon

PYTHON_LIB = Path("/usr/lib/python3.11")
PYTHON_SLICE_BYTES = 10_000_000  # "a few MB of real files", split over two layers
HELLO = b"hello from the lazy end-to-end image\n"
# The container that reads everything: every regular file's content, every entry's metadata.
# (busybox's find, sha256sum and stat only: see oci_image.BUSYBOX_APPLETS.) Directory sizes
# and mtimes are left out: they belong to the filesystem (FUSE vs ext4) and to runc, which
# creates mount points in the root.
READ_EVERYTHING = (
    "find / -xdev -type f -exec sha256sum {} + && "
    "find / -xdev ! -type d -exec stat -c '%n %f %u:%g %s %Y %N' {} + && "
    "find / -xdev -type d -exec stat -c '%n %f %u:%g' {} +"
)


def python_files() -> list[Path]:
    """A deterministic slice of the standard library: sorted walk, about PYTHON_SLICE_BYTES."""
    if not PYTHON_LIB.is_dir():
        pytest.skip(f"{PYTHON_LIB} is not there to build the test image from")
    picked: list[Path] = []
    total = 0
    for path in sorted(PYTHON_LIB.rglob("*")):
        if not path.is_file() or path.is_symlink() or "-packages" in str(path):
            continue
        picked.append(path)
        total += path.stat().st_size
        if total >= PYTHON_SLICE_BYTES:
            break
    return picked


def base_layer() -> bytes:
    """busybox-static with its applets (as oci.busybox_tar) and the small file to read."""
    builder = oci.TarBuilder().dir("bin").dir("etc").dir("tmp", 0o1777)
    builder.file("bin/busybox", oci.BUSYBOX.read_bytes(), 0o755)
    for applet in oci.BUSYBOX_APPLETS:
        builder.symlink(f"bin/{applet}", "busybox")
    builder.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    return builder.file("etc/hello", HELLO).tar()


def add_host_files(builder: oci.TarBuilder, files: Sequence[Path]) -> oci.TarBuilder:
    """Each file at its own path, after the directories above it."""
    made: set[str] = set()
    for path in files:
        parts = str(path).lstrip("/").split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                builder.dir(directory)
                made.add(directory)
        builder.file("/".join(parts), path.read_bytes())
    return builder


def tree(output: str) -> list[str]:
    # Directory listing order differs between filesystems; the content must not.
    return sorted(output.splitlines())


def tree_after_overlayfs_pull(reference: str) -> list[str]:
    """What the read-everything container sees after an ordinary (overlayfs) pull."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    work = Path(tempfile.mkdtemp(prefix="lz", dir="/tmp"))
    try:
        with running_daemon(work / "d") as daemon, run_containerd(
            work / "c", daemon.address
        ) as containerd:
            containerd.ctr("image", "pull", "--plain-http", reference, timeout=120)
            output = containerd.ctr(
                "run", "--rm", reference, "tree", "/bin/sh", "-c", READ_EVERYTHING, timeout=180,
            ).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tree(output)


@contextlib.contextmanager
def lazy_stack(
    workdir: Path, *, background_fetch: bool = True, config_text: str = ""
) -> Iterator[tuple[Daemon, RunningContainerd]]:
    """lazysnap and containerd 1.6 with lazysnap as its proxy snapshotter. Without background
    fetch the registry serves only what containers read. ``config_text``: more of the daemon's
    configuration file (whole tables)."""
    if not containerd_available():
        pytest.skip("containerd, ctr, runc or the runc shim is not installed")
    extra_args: list[str] = []
    if not background_fetch or config_text:
        config = workdir / "lazysnap.toml"
        lazy = "" if background_fetch else "[lazy]\nbackground_fetch = false\n"
        config.write_text(lazy + config_text)
        extra_args = ["--config", str(config)]
    with running_daemon(workdir / "d", extra_args=extra_args) as daemon, \
            run_containerd(workdir / "c", daemon.address) as containerd:
        yield daemon, containerd
