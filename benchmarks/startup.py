#!/usr/bin/env python3
"""Container start-up from nothing local: overlayfs full pull vs lazysnap lazy pull (issue 5).

For each link (loopback, then a netproxy link of ``--mbit`` / ``--rtt-ms``), each workload and
each arm, on a fresh containerd root/state and a fresh lazysnap root (no cache can leak between
arms), it measures:

* time to first output: from the start of the pull command to the first line the container
  writes to stdout (``ctr run`` without a TTY, its stdout read through a pipe);
* bytes fetched by then (the proxy's downstream byte counter: blobs, manifests, HTTP headers;
  for lazysnap this includes what its background fetch got meanwhile), and the number of HTTP
  and Range requests the proxy saw;
* time until the whole image is local: for the full pull, the end of ``ctr image pull`` (it
  downloads and unpacks everything before it returns); for lazysnap, the moment the daemon logs
  ``layer fully fetched and verified`` for every layer of the image (its background fetch hashed
  the whole blob against its digest), polled every 50 ms.

Arms: ``overlayfs`` = ``ctr image pull --plain-http`` of the ordinary gzip image + ``ctr run``;
``estargz`` / ``zstd:chunked`` = ``lazysnap pull --snapshotter lazysnap`` of the same root file
system converted with lazysnap's writers (no prioritized files: unoptimized, as in the issue's
stargz comparison) + ``ctr run --snapshotter lazysnap``; ``stargz`` (optional) = the same
eStargz image pulled lazily by stargz-snapshotter 0.12 (``ctr-remote images rpull`` + ``ctr run
--snapshotter stargz``, its daemon with its default configuration); ``gzip+soci`` (optional) =
the overlayfs arm's plain gzip image indexed by ``lazysnap index`` (SOCI v2, spans of
``--soci-span-size``, 4 MiB by default) and pulled with ``lazysnap pull``; ``parallel``
(optional) = the overlayfs arm's image downloaded and unpacked in full by ``lazysnap pull
--parallel`` into lazysnap's ordinary snapshots (issue 14's parallel pull; not lazy, so its
whole image is local when the pull ends); ``ctr-remote`` / ``stargz-ctr-remote`` (optional) =
the gzip image converted by stargz-snapshotter's own
``ctr-remote image convert --estargz --oci`` (defaults: 4 MiB chunks), served by lazysnap / by
stargz-snapshotter; ``estargz+profile`` (optional) = the estargz arm's image under a
repository of its own per workload, whose startup profile (docs/profile.md) a recording run
(untimed, its own fresh containerd and daemon with ``[profile] publish``) pushed before the
measured run, which pulls with lazysnap's defaults from a fresh root and prefetches from the
profile; ``cri-*`` (optional) = the container
started through containerd's CRI plugin as kubelet does (cri_start.py; no pull command), with
overlayfs, lazysnap or stargz-snapshotter. ``--image two-layer`` splits the root file system
into a base layer and a python layer (image_variants.py). All images come from one
docker-registry on loopback; every pull goes through the netproxy (unlimited on the loopback
link) so that bytes are counted the same way for every arm.

The image (``--image one-layer``, the default) is a debootstrap bookworm minbase with python3
(one layer, ~66 MB gzip, ~175 MB tar), built once and cached with its OCI layouts under
/var/cache/lazysnap-bench/. ``--image gcc`` is a bookworm minbase on which ``apt-get install
--no-install-recommends gcc libc6-dev`` ran in a chroot, in two layers as ``FROM debian`` +
``RUN apt-get install`` would build it: the base system, then what the install added or changed
(image_variants.changed_members), built and cached the same way. Workloads need their image:
hello and imports run on the python images, gcc (writes hello.c in the container with printf,
compiles it, runs it) on the gcc image, read-everything on any. ``--workloads`` defaults to
those that run on ``--image``; naming one that does not is refused before anything starts.

    .venv/bin/python benchmarks/startup.py                   # loopback + 100 Mbit/s, 20 ms
    .venv/bin/python benchmarks/startup.py --quick           # loopback only
    .venv/bin/python benchmarks/startup.py --links limited --workloads hello,imports \\
        --mbit 100 --rtt-ms 20 --json /tmp/startup.json
    .venv/bin/python benchmarks/startup.py --image gcc --links limited --workloads gcc \\
        --arms overlayfs,estargz,stargz

Needs root, /dev/fuse, containerd 1.6 + ctr + runc, docker-registry and skopeo; the stargz arm
also ctr-remote (Debian's stargz-snapshotter) and containerd-stargz-grpc, which Debian does not
ship: unless one is on PATH it is built once from Debian's stargz-snapshotter library (see
ensure_stargz_grpc) and cached under /var/cache/lazysnap-bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cri_start import push_pause_image, remote_layers, start_through_cri  # noqa: E402
from image_variants import (  # noqa: E402
    changed_members,
    convert_with_ctr_remote,
    split_changed,
    split_python,
)
from netproxy import Counters, LinkProxy  # noqa: E402

from tests.support import oci_image as oci  # noqa: E402
from tests.support.containerd import CriSettings, RunningContainerd, run_containerd  # noqa: E402
from tests.support.cri import CriClient, cri_client  # noqa: E402
from tests.support.daemon import Daemon, running_daemon  # noqa: E402
from tests.support.docker_registry import run_registry  # noqa: E402

CACHE = Path("/var/cache/lazysnap-bench")
ROOTFS_TAR = CACHE / "bookworm-minbase-python3.tar"
# The gcc image: the minbase snapshot taken before `apt-get install gcc libc6-dev`, and after.
GCC_BASE_TAR = CACHE / "bookworm-minbase-before-gcc.tar"
GCC_ROOTFS_TAR = CACHE / "bookworm-minbase-gcc.tar"
GCC_PACKAGES = ("gcc", "libc6-dev")
MIRROR = "http://deb.debian.org/debian"
LAZYSNAP = REPO / ".venv" / "bin" / "lazysnap"
REPOSITORY = "bench/debian"

WORKLOADS: dict[str, list[str]] = {
    # The container must print to be observed; the imports workload prints after importing.
    "hello": ["python3", "-c", 'print("hello")'],
    "imports": ["python3", "-c", 'import json, asyncio, sqlite3; print("imported")'],
    "read-everything": [
        "sh", "-c", "find / -xdev -type f -exec cat {} + > /dev/null; echo done",
    ],
    # Writes hello.c inside the container, compiles it and runs it: the first line is the
    # compiled program's (gcc prints nothing when all goes well).
    "gcc": [
        "sh", "-c",
        "printf '#include <stdio.h>\\nint main(void) { puts(\"compiled hello\"); return 0; }\\n'"
        " > /tmp/hello.c && gcc -o /tmp/hello /tmp/hello.c && /tmp/hello",
    ],
}
# ctr-remote / stargz-ctr-remote: the image converted by stargz-snapshotter's own
# `ctr-remote image convert --estargz --oci` (its defaults), served by lazysnap / by
# stargz-snapshotter. The cri-* arms start the container as kubelet does, through containerd's
# CRI plugin (cri_start.py): no pull command runs.
ARMS = ("overlayfs", "estargz", "zstd:chunked", "estargz-opt", "stargz", "gzip+soci",
        "parallel", "ctr-remote", "stargz-ctr-remote", "cri-overlayfs", "cri-estargz",
        "cri-ctr-remote", "cri-stargz", "cri-stargz-ctr-remote", "estargz+profile")
DEFAULT_ARMS = ARMS[:3]
CRI_ARMS = tuple(arm for arm in ARMS if arm.startswith("cri-"))
ARM_TITLES = {
    "overlayfs": "overlayfs full pull",
    "estargz": "lazysnap eStargz",
    "zstd:chunked": "lazysnap zstd:chunked",
    "estargz-opt": "lazysnap eStargz opt.",
    "stargz": "stargz-snap. eStargz",
    "gzip+soci": "lazysnap gzip + SOCI",
    "parallel": "lazysnap parallel pull",
    "ctr-remote": "lazysnap ctr-remote",
    "stargz-ctr-remote": "stargz-sn. ctr-remote",
    "cri-overlayfs": "CRI overlayfs",
    "cri-estargz": "CRI lazysnap eStargz",
    "cri-ctr-remote": "CRI lazysnap ctr-rem.",
    "cri-stargz": "CRI stargz-sn. eStargz",
    "cri-stargz-ctr-remote": "CRI stargz-sn. ctr-rem.",
    "estargz+profile": "lazysnap eStargz+prof.",
}
# The arms served by stargz-snapshotter rather than lazysnap, and those that pull everything.
STARGZ_ARMS = ("stargz", "stargz-ctr-remote", "cri-stargz", "cri-stargz-ctr-remote")
# parallel: the plain gzip image downloaded and unpacked in full by `lazysnap pull`'s parallel
# pull (issue 14, item 3) into lazysnap's ordinary snapshots, where overlayfs is containerd's.
FULL_PULL_ARMS = ("overlayfs", "cri-overlayfs", "parallel")
SNAPSHOTTER = {arm: "overlayfs" if arm in FULL_PULL_ARMS and arm != "parallel" else
               "stargz" if arm in STARGZ_ARMS else "lazysnap" for arm in ARMS}
# Each arm's image, as a layout kind (how it was converted). gzip+soci pulls the overlayfs arm's
# very blobs, under a tag of its own that `lazysnap index` turns into a SOCI-enabled image (a v2
# index with 4 MiB spans, the layer left as it is); stargz pulls the estargz arm's very image.
LAYOUT_KIND = {"overlayfs": "gzip", "estargz": "estargz", "zstd:chunked": "zstd:chunked",
               "estargz-opt": "estargz-opt", "stargz": "estargz", "gzip+soci": "gzip",
               "parallel": "gzip",
               "ctr-remote": "ctr-remote", "stargz-ctr-remote": "ctr-remote",
               "cri-overlayfs": "gzip", "cri-estargz": "estargz", "cri-ctr-remote": "ctr-remote",
               "cri-stargz": "estargz", "cri-stargz-ctr-remote": "ctr-remote",
               "estargz+profile": "estargz"}
# Arms of one kind pull the same tag, gzip+soci excepted.
TAGS = {arm: LAYOUT_KIND[arm].replace(":", "") for arm in ARMS} | {"gzip+soci": "gzip-soci"}
# Cached layouts are named after their kind (and chunk size, layer count and tars' content).
LAYOUT_DIRS = {"gzip": "gzip", "estargz": "estargz", "zstd:chunked": "zstdchunked",
               "estargz-opt": "estargz-opt", "ctr-remote": "ctr-remote-estargz"}
LAZYSNAP_WRITTEN = ("estargz", "zstd:chunked", "estargz-opt")  # what --chunk-size applies to
# --image: the python root file system as one layer, or as the base system and python; or the
# gcc root file system as the base system and what installing gcc added.
IMAGES = ("one-layer", "two-layer", "gcc")
PYTHON_IMAGES = ("one-layer", "two-layer")
# The images a workload can run on (read-everything runs on any): its command must be there.
WORKLOAD_IMAGES = {"hello": PYTHON_IMAGES, "imports": PYTHON_IMAGES, "gcc": ("gcc",),
                   "read-everything": IMAGES}
# The image config's default command (the benchmark always names its own).
IMAGE_CMD = {"one-layer": ("python3",), "two-layer": ("python3",), "gcc": ("sh",)}
# estargz-opt (not a default arm: the targets are for unoptimized images) puts the files
# the hello and imports workloads open first, with the prefetch landmark, as an "optimized"
# eStargz does; the list comes from running them under strace in a chroot of the image.
PROFILED_WORKLOADS = {"one-layer": ("hello", "imports"), "two-layer": ("hello", "imports"),
                      "gcc": ("gcc",)}
# Issue 5: lazy time-to-first-output as a fraction of the full pull's, and whole-image-local
# (issue 5 asked <= 1.2x; issue 13 asks <= 1.0x on every image of the benchmark).
TARGETS = {"hello": 0.11, "imports": 0.17, "read-everything": 1.1}  # none for gcc
WHOLE_LOCAL_TARGET = 1.0
# Issue 13: lazysnap's first output as a fraction of stargz-snapshotter's on the same blobs.
STARGZ_TARGETS = {"hello": 0.7, "imports": 0.6, "gcc": 0.65}
STARGZ_COUNTERPART = {"estargz": "stargz", "estargz+profile": "stargz",
                      "ctr-remote": "stargz-ctr-remote",
                      "cri-estargz": "cri-stargz", "cri-ctr-remote": "cri-stargz-ctr-remote"}
# estargz+profile: the estargz arm's image under a repository of its own per workload (referrers
# belong to a repository, so no other arm ever finds its profile); before each measured run, a
# recording run on its own fresh containerd and daemon ([profile] publish) runs the workload
# and pushes its startup profile straight to the registry; the measured run then pulls with
# the daemon's defaults ([profile] prefetch on).
PROFILE_ARMS = ("estargz+profile",)
PROFILE_RECORD_SECONDS = 10
PROFILE_PUBLISHED = "startup profile published"
PROFILE_NOT_PUBLISHED = ("startup_profile_publish_failed", "startup_profile_skipped")
FULLY_FETCHED = "layer fully fetched and verified"
FETCH_STOPPED = "background fetch stopped"

# stargz-snapshotter logs a latency metric (at info, see STARGZ_GRPC_MAIN) when a layer's
# background fetch returned: it then has the whole blob in its cache and every file decompressed
# (fs/layer.backgroundFetch); a failure also logs this warning.
STARGZ_BG_DONE = '"operation":"background_fetch_total"'
STARGZ_BG_FAILED = "failed to fetch whole layer"

RUN_TIMEOUT = 900.0  # one container run, read-everything on a slow link included
LOCAL_TIMEOUT = 900.0  # waiting for the background fetch after the container exited


def repository(arm: str, workload: str) -> str:
    """The repository an arm's measured run pulls from."""
    return f"{REPOSITORY}-profile-{workload}" if arm in PROFILE_ARMS else REPOSITORY


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the image ------------------------------------------------------------------------------

def ensure_rootfs() -> Path:
    """The debootstrap root file system as a tar, built once (a few minutes) and cached."""
    if ROOTFS_TAR.exists():
        return ROOTFS_TAR
    build = _debootstrap(("python3",))
    try:
        _drop_package_downloads(build)
        _tar_rootfs(build, ROOTFS_TAR)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return ROOTFS_TAR


def ensure_gcc_rootfs() -> tuple[Path, Path]:
    """The gcc image's root file systems as tars, built once (a few minutes) and cached: a
    minbase, then the same tree after ``apt-get install gcc libc6-dev`` in a chroot of it,
    as ``FROM debian`` + ``RUN apt-get install ...`` builds it (same files, same mtimes for
    what the install left alone, so the second tar's changes are exactly what it did)."""
    if GCC_BASE_TAR.exists() and GCC_ROOTFS_TAR.exists():
        return GCC_BASE_TAR, GCC_ROOTFS_TAR
    build = _debootstrap(())
    try:
        _drop_package_downloads(build)
        _tar_rootfs(build, GCC_BASE_TAR)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
               "LC_ALL": "C"}
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        log(f"apt-get install {' '.join(GCC_PACKAGES)} in a chroot of {build}")
        for command in (["apt-get", "update"],
                        ["apt-get", "install", "-y", "--no-install-recommends", *GCC_PACKAGES],
                        ["apt-get", "clean"]):
            subprocess.run([chroot, str(build), *command], check=True, env=env,
                           stdout=subprocess.DEVNULL, timeout=1800)
        _drop_package_downloads(build)
        _tar_rootfs(build, GCC_ROOTFS_TAR)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return GCC_BASE_TAR, GCC_ROOTFS_TAR


def _debootstrap(include: Sequence[str]) -> Path:
    """A fresh debootstrap bookworm minbase (plus ``include``) in a folder under CACHE."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if shutil.which("debootstrap") is None:
        log("installing debootstrap")
        subprocess.run(["apt-get", "install", "-y", "debootstrap"], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
    build = Path(tempfile.mkdtemp(prefix="rootfs.", dir=CACHE))
    extra = [f"--include={','.join(include)}"] if include else []
    log(f"{' '.join(['debootstrap', '--variant=minbase', *extra])} bookworm -> {build}")
    try:
        subprocess.run(["debootstrap", "--variant=minbase", *extra, "bookworm", str(build),
                        MIRROR], check=True, stdout=subprocess.DEVNULL, timeout=1800)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return build


def _drop_package_downloads(build: Path) -> None:
    """What a real image build would not ship: downloaded packages and package lists."""
    for deb in (build / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    shutil.rmtree(build / "var/lib/apt/lists", ignore_errors=True)
    (build / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _tar_rootfs(build: Path, dest: Path) -> None:
    partial = dest.with_suffix(".tar.part")
    # Device nodes and the contents of /proc and /sys belong to the runtime, not the image.
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(build), "--exclude=./dev/*",
         "--exclude=./proc/*", "--exclude=./sys/*", "-cf", str(partial), "."],
        check=True, timeout=600,
    )
    partial.rename(dest)


@dataclass(frozen=True)
class ImageInfo:
    arm: str
    layout: Path
    blob_sizes: tuple[int, ...]
    tar_size: int

    @property
    def compressed(self) -> int:
        return sum(self.blob_sizes)


def _resolve_in(root: Path, path: str) -> list[str]:
    """``path`` as the chroot sees it, resolved inside ``root``: every symlink met on the way
    and the final target, as names relative to the root (tar member names)."""
    names: list[str] = []
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink() and hops < 40:
            hops += 1
            names.append("/".join([*resolved, part]))
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    if root.joinpath(*resolved).is_file():
        names.append("/".join(resolved))
    return names


def profile_files(tar_path: Path, tar_key: str,
                  workloads: Sequence[str] = PROFILED_WORKLOADS["one-layer"]) -> list[str]:
    """Files ``workloads`` open in the root file system ``tar_path``, in first-open order
    (cached next to the tar)."""
    cached = CACHE / f"profile-{tar_key}.txt"
    if cached.exists():
        return cached.read_text().split()
    if shutil.which("strace") is None:
        raise RuntimeError("estargz-opt needs strace to profile the workloads "
                           "(apt-get install strace)")
    root = Path(tempfile.mkdtemp(prefix="profile.", dir=CACHE))
    names: list[str] = []
    try:
        subprocess.run(["tar", "-C", str(root), "-xf", str(tar_path)], check=True, timeout=600)
        for workload in workloads:
            trace = root / "strace.out"
            subprocess.run(
                ["strace", "-f", "-qq", "-e", "trace=execve,open,openat", "-o", str(trace),
                 shutil.which("chroot") or "/usr/sbin/chroot", str(root), *WORKLOADS[workload]],
                check=True, capture_output=True, timeout=300, env={"PATH": "/usr/bin:/bin"},
            )
            for line in trace.read_text(errors="replace").splitlines():
                if "ENOENT" in line or '"' not in line:
                    continue
                for name in _resolve_in(root, line.split('"')[1]):
                    if name not in names:
                        names.append(name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cached.write_text("\n".join(names) + "\n")
    return names


def _files_key(paths: Sequence[Path]) -> str:
    """A short name for the content of these files, in this order."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:12]


def image_rootfs(image: str) -> Path:
    """The whole root file system of ``--image`` as one tar (built once and cached)."""
    return ensure_gcc_rootfs()[1] if image == "gcc" else ensure_rootfs()


def ensure_layer_tars(image: str) -> list[Path]:
    """The layer tars of ``--image``: the python root file system as one layer, or split into
    the base system and python; or the gcc root file system split into the base system and
    what installing gcc added or changed (each split built once and cached)."""
    rootfs = image_rootfs(image)
    if image == "one-layer":
        return [rootfs]
    if image == "gcc":
        before = ensure_gcc_rootfs()[0]
        split = CACHE / f"gcc-{_files_key([before, rootfs])}"
        names = ("base.tar", "gcc.tar")
    else:
        split = CACHE / f"two-layer-{_files_key([rootfs])}"
        names = ("base.tar", "python.tar")
    tars = [split / name for name in names]
    if not split.is_dir():
        scratch = Path(tempfile.mkdtemp(prefix="split.", dir=CACHE))
        try:
            if image == "gcc":
                counts = split_changed(rootfs, changed_members(before, rootfs),
                                       *(scratch / name for name in names))
            else:
                counts = split_python(rootfs, *(scratch / name for name in names))
            log(f"split the root file system: {counts[0]} base and {counts[1]} "
                f"{names[1].removesuffix('.tar')} members (once; cached in {split})")
            scratch.rename(split)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return tars


def _profiled_names(tar_path: Path) -> set[str]:
    with tarfile.open(tar_path) as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


def _convert_layout(kind: str, tars: Sequence[Path], chunk_size: int | None,
                    layout: Path, image: str) -> None:
    """Write the OCI layout of one layout kind (see LAYOUT_KIND) at ``layout``."""
    log(f"building the {kind} layout (once; cached in {layout})")
    options: dict[str, object] = {"chunk_size": chunk_size} if chunk_size else {}
    rootfs = image_rootfs(image) if kind == "estargz-opt" else None
    profile = profile_files(rootfs, _files_key([rootfs]), PROFILED_WORKLOADS[image]) \
        if rootfs else []
    layers = []
    for tar_path in tars:
        tar = tar_path.read_bytes()
        if kind == "gzip":
            layers.append(oci.gzip_layer(tar))
            continue
        if profile:  # each layer puts first the profiled files it holds
            held = _profiled_names(tar_path)
            options["prioritized"] = [name for name in profile if name in held]
        layers.append(oci.seekable_layer(tar, kind.removesuffix("-opt"), **options))
    scratch = Path(tempfile.mkdtemp(prefix="layout.", dir=CACHE))
    oci.write_layout(scratch, layers, tag="latest", cmd=IMAGE_CMD[image])
    layout.parent.mkdir(parents=True, exist_ok=True)
    scratch.rename(layout)


def ensure_layouts(
    tars: Path | Sequence[Path], chunk_size: int | None, arms: Sequence[str],
    image: str = IMAGES[0],
) -> dict[str, ImageInfo]:
    """One OCI layout per arm, built once per (layer tars, layout kind, chunk size) and cached.
    ``tars``: the root file system (one layer) or the layer tars of ensure_layer_tars of
    ``image``."""
    tars = [tars] if isinstance(tars, Path) else list(tars)
    tar_key = _files_key(tars)
    layers_suffix = "" if len(tars) == 1 else f"-{len(tars)}layers"

    def layout_of(kind: str) -> Path:
        suffix = f"-c{chunk_size}" if chunk_size and kind in LAZYSNAP_WRITTEN else ""
        layout = CACHE / "layouts" / f"{LAYOUT_DIRS[kind]}{suffix}{layers_suffix}-{tar_key}"
        if (layout / "index.json").exists():
            return layout
        if kind == "ctr-remote":  # converted from the plain gzip image, never re-chunked
            convert_with_ctr_remote(layout_of("gzip"), layout, CACHE)
        else:
            _convert_layout(kind, tars, chunk_size, layout, image)
        return layout

    infos: dict[str, ImageInfo] = {}
    for arm in arms:
        layout = layout_of(LAYOUT_KIND[arm])
        index = json.loads((layout / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.loads((layout / "blobs/sha256" / manifest_digest).read_text())
        infos[arm] = ImageInfo(arm, layout, tuple(int(x["size"]) for x in manifest["layers"]),
                               sum(t.stat().st_size for t in tars))
    return infos


# -- stargz-snapshotter ------------------------------------------------------------------------

# Debian's stargz-snapshotter 0.12 package ships ctr-remote only; its -dev package ships the
# library without cmd/containerd-stargz-grpc, and the library's service package cannot be built
# from Debian (its CRI keychain needs k8s.io/cri-api). This main does what 0.12's
# service.NewStargzSnapshotterService does, with the same configuration format.
STARGZ_GRPC_MAIN = r'''// containerd-stargz-grpc for the lazysnap benchmark (benchmarks/startup.py).
//
// What stargz-snapshotter 0.12's service.NewStargzSnapshotterService sets up (fs.NewFilesystem
// + snapshot.NewSnapshotter behind a snapshots gRPC server on a unix socket), without its CRI
// and kubeconfig keychains and credentials, with the same configuration file format: the fs
// options at the top level, [[resolver.host."HOST".mirrors]] host / insecure /
// request_timeout_sec. Per-layer latency metrics are logged at info.
package main

import (
	"context"
	"flag"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock",
		"address for the snapshotter's GRPC server")
	configPath := flag.String("config", "", "path to the configuration file")
	logLevel := flag.String("log-level", "info",
		"logging level [trace, debug, info, warn, error, fatal, panic]")
	rootDir := flag.String("root", "/var/lib/containerd-stargz-grpc",
		"path to the root directory for this snapshotter")
	flag.Parse()
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		log.L.WithError(err).Fatal("failed to prepare logger")
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var config Config
	if *configPath != "" {
		tree, err := toml.LoadFile(*configPath)
		if err != nil {
			log.G(ctx).WithError(err).Fatalf("failed to load config file %q", *configPath)
		}
		if err := tree.Unmarshal(&config); err != nil {
			log.G(ctx).WithError(err).Fatalf("failed to unmarshal config file %q", *configPath)
		}
	}
	snRoot := filepath.Join(*rootDir, "snapshotter")
	if err := os.MkdirAll(snRoot, 0700); err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to create %q", snRoot)
	}
	if err := overlayutils.Supported(snRoot); err != nil {
		log.G(ctx).WithError(err).Fatalf("snapshotter is not supported")
	}
	userxattr, err := overlayutils.NeedsUserXAttr(snRoot)
	if err != nil {
		log.G(ctx).WithError(err).Warnf(
			"cannot detect whether \"userxattr\" option needs to be used, assuming %v", userxattr)
	}
	opq := layer.OverlayOpaqueTrusted
	if userxattr {
		opq = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*rootDir, "stargz"), config.Config,
		stargzfs.WithGetSources(withCRILabels(source.FromDefaultLabels(registryHosts(config.Resolver)))),
		stargzfs.WithOverlayOpaqueType(opq),
		// Per-layer latency metrics (mount, prefetch, background fetch) as info log lines.
		stargzfs.WithMetricsLogLevel(logrus.InfoLevel))
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to configure filesystem")
	}
	rs, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to configure snapshotter")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to create directory %q", filepath.Dir(*address))
	}
	if err := os.RemoveAll(*address); err != nil {
		log.G(ctx).WithError(err).Fatalf("failed to remove %q", *address)
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("error on listen socket %q", *address)
	}
	go func() {
		if err := rpc.Serve(l); err != nil {
			log.G(ctx).WithError(err).Fatalf("error on serving via socket %q", *address)
		}
	}()
	log.G(ctx).Info("serving")
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	<-signals
	rpc.Stop()
	if err := rs.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("closing the snapshotter")
	}
	log.G(ctx).Info("exiting")
}

// Config is service.Config without the keychains.
type Config struct {
	fsconfig.Config
	Resolver ResolverConfig `toml:"resolver"`
}

// ResolverConfig is service/resolver.Config.
type ResolverConfig struct {
	Host map[string]HostConfig `toml:"host"`
}

type HostConfig struct {
	Mirrors []MirrorConfig `toml:"mirrors"`
}

type MirrorConfig struct {
	Host              string `toml:"host"`
	Insecure          bool   `toml:"insecure"`
	RequestTimeoutSec int    `toml:"request_timeout_sec"`
}

// registryHosts is service/resolver.RegistryHostsFromConfig without credentials.
// A pull through containerd's CRI plugin labels each layer with cri.* names rather than the
// stargz.* names ctr-remote rpull sets; the real daemon reads both. Give the CRI values to the
// default-label source under its own names, keeping any stargz.* label already there.
var criLabelNames = map[string]string{
	"containerd.io/snapshot/cri.image-ref":    "containerd.io/snapshot/remote/stargz.reference",
	"containerd.io/snapshot/cri.layer-digest": "containerd.io/snapshot/remote/stargz.digest",
	"containerd.io/snapshot/cri.image-layers": "containerd.io/snapshot/remote/stargz.layers",
}

func withCRILabels(get source.GetSources) source.GetSources {
	return func(labels map[string]string) ([]source.Source, error) {
		named := make(map[string]string, len(labels)+len(criLabelNames))
		for k, v := range labels {
			named[k] = v
		}
		for cri, stargz := range criLabelNames {
			if v, ok := labels[cri]; ok {
				if _, set := named[stargz]; !set {
					named[stargz] = v
				}
			}
		}
		return get(named)
	}
}

func registryHosts(cfg ResolverConfig) source.RegistryHosts {
	return func(ref reference.Spec) (hosts []docker.RegistryHost, _ error) {
		host := ref.Hostname()
		for _, h := range append(cfg.Host[host].Mirrors, MirrorConfig{Host: host}) {
			client := rhttp.NewClient()
			client.Logger = nil
			tr := client.StandardClient()
			if h.RequestTimeoutSec >= 0 {
				if h.RequestTimeoutSec == 0 {
					tr.Timeout = 30 * time.Second
				} else {
					tr.Timeout = time.Duration(h.RequestTimeoutSec) * time.Second
				}
			}
			config := docker.RegistryHost{
				Client:       tr,
				Host:         h.Host,
				Scheme:       "https",
				Path:         "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
				Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(tr)),
			}
			if localhost, _ := docker.MatchLocalhost(config.Host); localhost || h.Insecure {
				config.Scheme = "http"
			}
			if config.Host == "docker.io" {
				config.Host = "registry-1.docker.io"
			}
			hosts = append(hosts, config)
		}
		return
	}
}
'''
STARGZ_GRPC_DEBS = ("golang-go", "golang-github-containerd-stargz-snapshotter-dev")
STARGZ_LIBRARY = Path("/usr/share/gocode/src/github.com/containerd/stargz-snapshotter")


def _soci_index(reference: str, span_size: str) -> None:
    """``lazysnap index`` of the pushed gzip image; its build time and zTOC size are logged."""
    started = time.monotonic()
    done = subprocess.run([str(LAZYSNAP), "index", reference, "--span-size", span_size],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lazysnap index {reference} failed: {done.stderr.strip()[-2000:]}")
    log(f"lazysnap index: {time.monotonic() - started:.1f} s; {done.stdout.strip()}")


def ensure_stargz_grpc() -> Path:
    """containerd-stargz-grpc: from PATH, or built once (about a minute) and cached."""
    found = shutil.which("containerd-stargz-grpc")
    if found:
        return Path(found)
    key = hashlib.sha256(STARGZ_GRPC_MAIN.encode()).hexdigest()[:12]
    binary = CACHE / f"stargz-grpc-{key}" / "containerd-stargz-grpc"
    if binary.exists():
        return binary
    if shutil.which("go") is None or not STARGZ_LIBRARY.is_dir():
        log(f"installing {' '.join(STARGZ_GRPC_DEBS)} (to build containerd-stargz-grpc)")
        subprocess.run(["apt-get", "install", "-y", *STARGZ_GRPC_DEBS], check=True,
                       stdout=subprocess.DEVNULL, timeout=1200)
    CACHE.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="stargz-grpc.", dir=CACHE))
    try:
        source = build / "src" / "lazysnapbench" / "containerd-stargz-grpc"
        source.mkdir(parents=True)
        (source / "main.go").write_text(STARGZ_GRPC_MAIN)
        log("building containerd-stargz-grpc from Debian's stargz-snapshotter library (once)")
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{build}:/usr/share/gocode",
               "GOCACHE": str(build / "cache"), "GOFLAGS": ""}
        done = subprocess.run(["go", "build", "-o", str(build / "out"), "."], cwd=source,
                              env=env, capture_output=True, text=True, timeout=1800,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"building containerd-stargz-grpc failed: {done.stderr[-2000:]}")
        binary.parent.mkdir(exist_ok=True)
        (build / "out").rename(binary)  # atomic: a concurrent run sees all of it or nothing
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return binary


def compile_lazysnap(tree: Path = REPO) -> None:
    """Byte-compile lazysnap's packages in place (``__pycache__``, ignored by git), as an
    installed package is. Without this, an environment with PYTHONDONTWRITEBYTECODE makes every
    ``lazysnap pull`` compile its modules from source again."""
    packages = [str(tree / name) for name in ("snapshotter", "registry", "fusefs")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], env=env, check=True,
                   capture_output=True)


def stargz_config(registry_host: str, settings: str = "") -> str:
    """Its defaults, plus plain HTTP for the proxy's address (the image reference's host).
    ``settings``: top-level TOML lines that change a default."""
    return (
        settings
        + "# stargz-snapshotter 0.12 defaults otherwise (benchmarks/README.md lists them)\n"
        f'[[resolver.host."{registry_host}".mirrors]]\n'
        f'  host = "{registry_host}"\n'
        "  insecure = true\n"
    )


@contextlib.contextmanager
def running_stargz(workdir: Path, binary: Path, registry_host: str,
                   timeout: float = 30.0, settings: str = "") -> Iterator[Path]:
    """containerd-stargz-grpc on a fresh root; yields its socket. Stopped (SIGTERM, then
    SIGKILL) and its FUSE mounts unmounted on exit."""
    workdir.mkdir(parents=True)
    config = workdir / "config.toml"
    config.write_text(stargz_config(registry_host, settings))
    address = workdir / "s.sock"
    log_path = workdir / "stargz.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), "--address", str(address), "--root", str(workdir / "root"),
             "--config", str(config), "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not address.exists():
            if process.poll() is not None:
                raise RuntimeError("containerd-stargz-grpc exited early: "
                                   + log_path.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd-stargz-grpc not ready in {timeout:.0f} s")
            time.sleep(0.05)
        yield address
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        unmount_under(workdir)


def _fuse_mounts_under(root: Path) -> int:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        return sum(1 for line in mounts
                   if line.split()[2].startswith("fuse")
                   and line.split()[1].encode().decode("unicode_escape").startswith(prefix))


# -- one measurement --------------------------------------------------------------------------

@dataclass
class Result:
    link: str
    workload: str
    arm: str
    ok: bool = False
    error: str = ""
    pull_s: float = 0.0  # the pull command alone
    first_output_s: float = 0.0
    exit_s: float = 0.0
    local_s: float = 0.0  # whole image local (see the module doc)
    first_line: str = ""
    fetched_first: int = 0  # proxy bytes downstream at first output
    requests_first: int = 0
    ranges_first: int = 0
    range_bytes_first: int = 0  # what those Range headers asked for in total
    fetched_local: int = 0  # ... once the whole image was local
    requests_local: int = 0
    ranges_local: int = 0
    pull_summary: str = ""
    # zTOC layers: what background fetch requested for the blob check, and what it read back
    # from readers' held bytes instead (the daemon's ztoc_background_fetched events).
    ztoc_fetched: int = 0
    ztoc_held_reused: int = 0


def container_id(number: int) -> str:
    """The container (CRI: pod) name of measurement ``number``. runc keeps its state under
    /run/containerd/runc/<namespace>/<id> whichever containerd started it, so two runs of this
    script at once (other users of the machine) must not use the same names."""
    return f"bench{os.getpid()}-{number}"


def _kill_after(process: subprocess.Popen[bytes], seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, process.kill)
    timer.daemon = True
    timer.start()
    return timer


def _pull(arm: str, reference: str, containerd: RunningContainerd, hosts_dir: Path,
          daemon_address: Path | None) -> str:
    if arm == "overlayfs":
        command = ["ctr", "--address", str(containerd.address), "--namespace",
                   containerd.namespace, "image", "pull", "--plain-http", reference]
    elif arm in STARGZ_ARMS:
        # rpull adds the labels stargz-snapshotter needs (image reference, layer digests) and
        # unpacks into its snapshotter ("stargz" by default).
        command = ["ctr-remote", "--address", str(containerd.address), "--namespace",
                   containerd.namespace, "images", "rpull", "--plain-http", reference]
    else:
        command = [str(LAZYSNAP), "pull", reference, "--snapshotter", "lazysnap",
                   "--address", str(containerd.address), "--namespace", containerd.namespace,
                   "--hosts-dir", str(hosts_dir), "--snapshotter-address", str(daemon_address)]
        if arm == "parallel":
            command.append("--parallel")
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _ztoc_background(path: Path) -> tuple[int, int]:
    """Sums of ``fetched_bytes`` and ``held_bytes_reused`` over the daemon's
    ``ztoc_background_fetched`` events (JSON log lines)."""
    fetched = reused = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0, 0
    for line in lines:
        if '"ztoc_background_fetched"' not in line:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            fetched += int(record.get("fetched_bytes", 0))
            reused += int(record.get("held_bytes_reused", 0))
    return fetched, reused


def _count_in_log(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


def measure(
    link: str, workload: str, arm: str, image: ImageInfo, reference: str, proxy: LinkProxy,
    workdir: Path, number: int, *, background_fetch: bool = True,
    stargz_grpc: Path | None = None, trace: Path | None = None, pause: str = "",
    lazy_settings: tuple[str, ...] = (),
) -> Result:
    """One measurement on a fresh containerd and snapshotter. ``pause``: the sandbox image
    reference, for the CRI arms."""
    result = Result(link, workload, arm)
    workdir.mkdir(parents=True)
    hosts_dir = workdir / "hosts"  # empty: loopback registries are plain HTTP by default
    hosts_dir.mkdir()
    lazy = arm not in FULL_PULL_ARMS
    # info, not debug: per-read debug logging would slow the daemon down.
    daemon_args = ["--log-level", "info"]
    settings = [*([] if background_fetch else ["background_fetch = false"]), *lazy_settings]
    if settings:
        config = workdir / "lazysnap.toml"
        config.write_text("[lazy]\n" + "".join(f"{line}\n" for line in settings))
        daemon_args += ["--config", str(config)]
    with contextlib.ExitStack() as stack:
        daemon: Daemon | None = None
        stargz: Path | None = None
        if arm in STARGZ_ARMS:
            # Only stargz-snapshotter runs (no idle lazysnap daemon); containerd's lazysnap
            # plugin then points at a socket nobody listens on, which it tolerates.
            assert stargz_grpc is not None
            stargz = stack.enter_context(
                running_stargz(workdir / "s", stargz_grpc, reference.split("/", 1)[0]))
            lazysnap_address = workdir / "no-lazysnap.sock"
        else:
            daemon = stack.enter_context(running_daemon(workdir / "d", extra_args=daemon_args))
            lazysnap_address = daemon.address
        cri = CriSettings(sandbox_image=pause, snapshotter=SNAPSHOTTER[arm]) \
            if arm in CRI_ARMS else None
        # Stopped before the snapshotters (the stack unwinds in reverse).
        containerd = stack.enter_context(run_containerd(
            workdir / "c", lazysnap_address,
            extra_proxy_plugins={"stargz": stargz} if stargz else None, cri=cri))
        client = stack.enter_context(cri_client(containerd.address)) if cri else None
        if client is not None:
            client.pull(pause)  # a node has its pause image: pulled before the clock starts
        if trace is not None and daemon is not None:  # started before the clock starts
            stack.enter_context(_tracing(daemon.address, trace))
        before = proxy.counters()
        started = time.monotonic()
        try:
            if client is not None:
                return _measure_cri_from(result, started, before, arm, image, reference, proxy,
                                         containerd, client, daemon, number, lazy,
                                         background_fetch, workdir)
            return _measure_from(result, started, before, arm, image, reference, proxy,
                                 containerd, daemon, hosts_dir, number, lazy,
                                 background_fetch, workdir)
        finally:
            _write_request_log(workdir / "proxy-requests.tsv", proxy, started)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _tracing(address: Path, output: Path) -> Iterator[None]:
    """`lazysnap trace record` from before the pull until the measurement ends (--trace)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen([str(LAZYSNAP), "trace", "record", "--address", str(address),
                                 "--output", str(output)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (output.exists() and output.stat().st_size) and time.monotonic() < deadline:
        if recorder.poll() is not None:  # no tracing: the error is in its stderr
            raise RuntimeError(f"trace record failed: {recorder.communicate()[1].decode()}")
        time.sleep(0.02)  # its start line is written once the daemon records
    try:
        yield
    finally:
        recorder.terminate()  # the recorder ends its file cleanly on SIGTERM
        try:
            recorder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()
        log(f"    trace: {output}")


def _write_request_log(path: Path, proxy: LinkProxy, started: float) -> None:
    """What the proxy saw, for --keep-logs: seconds since the pull started, connection,
    method, blob (last path element), range start, range length (MiB)."""
    lines = ["seconds\tconn\tmethod\ttarget\tstart\tMiB"]
    for r in proxy.requests_since(started):
        length = (r.end - r.start + 1) / (1 << 20) if r.start >= 0 and r.end >= 0 else math.nan
        lines.append(f"{r.at - started:.3f}\t{r.connection}\t{r.method}\t"
                     f"{r.path.rsplit('/', 1)[-1][:19]}\t{r.start}\t{length:.2f}")
    path.write_text("\n".join(lines) + "\n")


def _measure_from(
    result: Result, started: float, before: Counters, arm: str, image: ImageInfo,
    reference: str, proxy: LinkProxy, containerd: RunningContainerd, daemon: Daemon | None,
    hosts_dir: Path, number: int, lazy: bool, background_fetch: bool, workdir: Path,
) -> Result:
    result.pull_summary = _pull(arm, reference, containerd, hosts_dir,
                                daemon.address if daemon else None)
    result.pull_s = time.monotonic() - started
    if arm in STARGZ_ARMS and not _stargz_mounted_every_layer(result, image, workdir):
        return result
    snapshotter = [] if arm == "overlayfs" else [
        "--snapshotter", "stargz" if arm in STARGZ_ARMS else "lazysnap"]

    command = ["ctr", "--address", str(containerd.address), "--namespace",
               containerd.namespace, "run", "--rm", *snapshotter,
               reference, container_id(number), *WORKLOADS[result.workload]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = _kill_after(process, RUN_TIMEOUT)
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        result.first_output_s = time.monotonic() - started
        at_first = proxy.counters().minus(before)
        _, errors = process.communicate()
        result.exit_s = time.monotonic() - started
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    result.first_line = first.decode(errors="replace").strip()
    result.fetched_first = at_first.bytes_down
    result.requests_first = at_first.http_requests
    result.ranges_first = at_first.range_requests
    result.range_bytes_first = at_first.range_bytes
    if process.returncode != 0 or not first:
        result.error = (f"ctr run exited {process.returncode}: "
                        f"{errors.decode(errors='replace').strip()[-1000:]}")
        return result
    return _until_local(result, started, before, arm, image, proxy, daemon, lazy,
                        background_fetch, workdir)


def _measure_cri_from(
    result: Result, started: float, before: Counters, arm: str, image: ImageInfo,
    reference: str, proxy: LinkProxy, containerd: RunningContainerd, client: CriClient,
    daemon: Daemon | None, number: int, lazy: bool, background_fetch: bool, workdir: Path,
) -> Result:
    """The CRI arms: no pull command, kubelet's calls through containerd's CRI plugin."""
    at_first: list[Counters] = []
    times = start_through_cri(
        client, reference, WORKLOADS[result.workload], workdir / "pods", container_id(number),
        started, RUN_TIMEOUT, lambda: at_first.append(proxy.counters().minus(before)))
    result.pull_s, result.first_output_s = times.pull_s, times.first_output_s
    result.exit_s, result.first_line = times.exit_s, times.first_line
    result.fetched_first = at_first[0].bytes_down
    result.requests_first = at_first[0].http_requests
    result.ranges_first = at_first[0].range_requests
    result.range_bytes_first = at_first[0].range_bytes
    result.pull_summary = f"CRI PullImage {times.image_id[:19]}"
    if arm in STARGZ_ARMS:
        if not _stargz_mounted_every_layer(result, image, workdir):
            return result
    elif lazy:  # the same summary shape as `lazysnap pull`'s, checked in _until_local
        remote = remote_layers(containerd, SNAPSHOTTER[arm], image.layout)
        result.pull_summary += f" ({remote} remote layers)"
    if times.exit_code != 0:
        result.error = f"the container exited {times.exit_code}"
        return result
    return _until_local(result, started, before, arm, image, proxy, daemon, lazy,
                        background_fetch, workdir)


def _stargz_mounted_every_layer(result: Result, image: ImageInfo, workdir: Path) -> bool:
    """A layer stargz-snapshotter serves lazily is a FUSE mount under its root; one that fell
    back to a download-and-unpack is not. Sets the error otherwise."""
    mounted = _fuse_mounts_under(workdir / "s" / "root")
    result.pull_summary = f"{result.pull_summary} ({mounted} remote layers mounted)"
    if mounted != len(image.blob_sizes):
        result.error = f"layers were not served lazily: {mounted} FUSE mounts"
        return False
    return True


def _until_local(
    result: Result, started: float, before: Counters, arm: str, image: ImageInfo,
    proxy: LinkProxy, daemon: Daemon | None, lazy: bool, background_fetch: bool, workdir: Path,
) -> Result:
    """After the container exited: wait until the whole image is local, then check that its
    layers were served lazily."""
    stargz_log = workdir / "s" / "stargz.log"
    if arm in STARGZ_ARMS:
        layers = len(image.blob_sizes)
        deadline = time.monotonic() + LOCAL_TIMEOUT
        while _count_in_log(stargz_log, STARGZ_BG_DONE) < layers:
            if _count_in_log(stargz_log, STARGZ_BG_FAILED):
                result.error = "stargz background fetch failed (see stargz.log)"
                return result
            if time.monotonic() > deadline:
                result.error = f"stargz: not fully fetched after {LOCAL_TIMEOUT:.0f} s"
                return result
            time.sleep(0.05)
        result.local_s = time.monotonic() - started
    elif lazy and not background_fetch:
        result.local_s = math.nan  # never, by construction
    elif lazy:
        layers = len(image.blob_sizes)
        deadline = time.monotonic() + LOCAL_TIMEOUT
        assert daemon is not None
        while _count_in_log(daemon.log_path, FULLY_FETCHED) < layers:
            if _count_in_log(daemon.log_path, FETCH_STOPPED):
                result.error = "background fetch stopped (see the daemon log)"
                return result
            if time.monotonic() > deadline:
                result.error = f"not fully fetched after {LOCAL_TIMEOUT:.0f} s"
                return result
            time.sleep(0.05)
        result.local_s = time.monotonic() - started
        result.ztoc_fetched, result.ztoc_held_reused = _ztoc_background(daemon.log_path)
    else:
        result.local_s = result.pull_s
    at_local = proxy.counters().minus(before)
    result.fetched_local = at_local.bytes_down
    result.requests_local = at_local.http_requests
    result.ranges_local = at_local.range_requests
    remote = re.search(r"\((\d+) remote", result.pull_summary)
    if lazy and arm not in STARGZ_ARMS and (
            remote is None or int(remote.group(1)) != len(image.blob_sizes)):
        result.error = f"layers were not served lazily: {result.pull_summary}"
        return result
    result.ok = True
    return result


def record_profile(workload: str, reference: str, workdir: Path, number: int,
                   lazy_settings: tuple[str, ...]) -> None:
    """The estargz+profile arm's recording run: pull, run the workload, and wait until the
    daemon pushed (or had already pushed) the image's startup profile. Not timed; straight to
    the registry on loopback, so that every link's measured run finds the same profile."""
    if reference in _PROFILED:  # the same workload on another link: recorded already
        return
    workdir.mkdir(parents=True)
    hosts_dir = workdir / "hosts"
    hosts_dir.mkdir()
    config = workdir / "lazysnap.toml"
    # No background fetch: the recording needs only what the workload reads, and a whole image
    # fetched and written to disk here would still be flushing while the measured run starts.
    config.write_text("[lazy]\nbackground_fetch = false\n"
                      + "".join(f"{line}\n" for line in lazy_settings)
                      + f"[profile]\npublish = true\nrecord_seconds = {PROFILE_RECORD_SECONDS}\n")
    try:
        with running_daemon(workdir / "d", extra_args=["--log-level", "info", "--config",
                                                       str(config)]) as daemon, \
                run_containerd(workdir / "c", daemon.address) as containerd:
            _pull("estargz", reference, containerd, hosts_dir, daemon.address)
            containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference,
                           f"{container_id(number)}-rec", *WORKLOADS[workload],
                           timeout=RUN_TIMEOUT)
            deadline = time.monotonic() + PROFILE_RECORD_SECONDS + 120
            while PROFILE_PUBLISHED not in daemon.log():
                if any(event in daemon.log() for event in PROFILE_NOT_PUBLISHED):
                    raise RuntimeError("recording run: the profile was not published: "
                                       + daemon.log()[-2000:])
                if time.monotonic() > deadline:
                    raise RuntimeError("recording run: no profile published in time")
                time.sleep(0.2)
    finally:
        unmount_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    _PROFILED.add(reference)
    log(f"    startup profile recorded and published for {reference}")


_PROFILED: set[str] = set()


# -- clean-up -------------------------------------------------------------------------------

def unmount_under(root: Path) -> None:
    """Lazily unmount whatever is still mounted below ``root`` (deepest first)."""
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


# -- the run ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    name: str
    mbit: float
    rtt_ms: float

    @property
    def title(self) -> str:
        if not self.mbit and not self.rtt_ms:
            return "loopback (netproxy, unlimited)"
        return f"{self.mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT (netproxy)"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _per_range(r: Result) -> str:
    if not r.ranges_first:
        return "-"
    return f"{r.range_bytes_first / r.ranges_first / (1 << 20):.2f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 and not math.isnan(value) else "-"


def _versus_stargz(results: Sequence[Result]) -> list[str]:
    """Issue 13's ratios: each lazysnap arm's first output over stargz-snapshotter's on the
    same blobs in this run, with the issue's target where it set one."""
    lines = []
    for workload in WORKLOADS:
        by_arm = {r.arm: r for r in results if r.workload == workload and r.ok}
        pairs = []
        for arm, stargz_arm in STARGZ_COUNTERPART.items():
            if arm in by_arm and stargz_arm in by_arm:
                ratio = by_arm[arm].first_output_s / by_arm[stargz_arm].first_output_s
                goal = STARGZ_TARGETS.get(workload)
                verdict = "" if goal is None else " ok" if ratio <= goal else " MISS"
                pairs.append(f"{ARM_TITLES[arm]} {ratio:.2f}x{verdict}")
        if pairs:
            goal = STARGZ_TARGETS.get(workload)
            lines.append(f"{workload}: lazysnap / stargz-snapshotter, first out"
                         + (f" (target <={goal:.2f}x)" if goal else "") + ": "
                         + ", ".join(pairs))
    return lines


def render(link: Link, results: Sequence[Result], images: dict[str, ImageInfo],
           note: str = "") -> str:
    out = [f"\n=== {link.title}{note} ==="]
    out.append("image: " + ", ".join(
        f"{ARM_TITLES[a]} {_mb(i.compressed)} MB" for a, i in images.items())
        + f"; tar {_mb(next(iter(images.values())).tar_size)} MB")
    header = (f"{'workload':<16} {'arm':<22} {'first out':>9} {'ratio':>6} {'target':>7} "
              f"{'fetched MB':>10} {'ratio':>6} {'req':>5} {'ranges':>6} {'MiB/rng':>7} "
              f"{'pull':>6} {'local':>7} {'ratio':>6} {'target':>7}")
    out += [header, "-" * len(header)]
    for workload in WORKLOADS:
        rows = [r for r in results if r.workload == workload]
        if not rows:
            continue
        plain_base = next((r for r in rows if r.arm == "overlayfs" and r.ok), None)
        cri_base = next((r for r in rows if r.arm == "cri-overlayfs" and r.ok), None)
        for r in rows:
            if not r.ok:
                out.append(f"{workload:<16} {ARM_TITLES[r.arm]:<22} FAILED: {r.error[:160]}")
                continue
            # The CRI arms compare with the full pull through CRI when it ran.
            base = (cri_base or plain_base) if r.arm in CRI_ARMS else (plain_base or cri_base)
            lazy = r.arm not in FULL_PULL_ARMS
            first_ratio = _ratio(r.first_output_s, base.first_output_s) if base else "-"
            fetched_ratio = _ratio(r.fetched_first, base.fetched_first) if base else "-"
            local_ratio = _ratio(r.local_s, base.local_s) if base else "-"
            goal = TARGETS.get(workload) if lazy else None
            target = f"<={goal:.2f}x" if goal else ""
            local_target = f"<={WHOLE_LOCAL_TARGET:.1f}x" if lazy else ""
            if lazy and base:
                if goal:
                    target += " ok" if r.first_output_s <= goal * base.first_output_s \
                        else " MISS"
                if math.isnan(r.local_s):
                    local_target = ""
                else:
                    local_target += " ok" if r.local_s <= WHOLE_LOCAL_TARGET * base.local_s \
                        else " MISS"
            out.append(
                f"{workload:<16} {ARM_TITLES[r.arm]:<22} {r.first_output_s:>8.2f}s "
                f"{first_ratio:>6} {target:>7} {_mb(r.fetched_first):>10} {fetched_ratio:>6} "
                f"{r.requests_first:>5} {r.ranges_first:>6} {_per_range(r):>7} "
                f"{r.pull_s:>5.2f}s "
                f"{r.local_s:>6.2f}s {local_ratio:>6} {local_target:>7}"
            )
    out += _versus_stargz(results)
    out.append(
        "first out = pull command start -> first stdout line of the container; fetched = proxy "
        "bytes downstream by then (lazysnap: on-demand + background); req/ranges = HTTP "
        "requests / Range headers by then; MiB/rng = mean length those Range headers asked "
        "for; pull = the pull command alone; local = whole image "
        "local (full pull: end of ctr image pull; lazysnap: daemon logged every layer fully "
        "fetched and verified; stargz-snapshotter: it logged every layer's background fetch "
        "done); ratios vs the overlayfs full pull of the same workload (CRI arms: vs CRI "
        "overlayfs if it ran). CRI arms: first out = PullImage start -> first line in the "
        "container's CRI log (RunPodSandbox, CreateContainer, StartContainer in between); "
        "pull = PullImage."
    )
    return "\n".join(out)


def choose_workloads(listed: str | None, image: str) -> list[str]:
    """The ``--workloads`` list, checked against ``image``; by default every workload that runs
    on it."""
    if listed is None:
        return [w for w in WORKLOADS if image in WORKLOAD_IMAGES[w]]
    workloads = [w.strip() for w in listed.split(",") if w.strip()]
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        if image not in WORKLOAD_IMAGES[name]:
            raise SystemExit(f"workload {name!r} does not run on the {image} image; "
                             f"use --image {' or '.join(WORKLOAD_IMAGES[name])}")
    return workloads


def run(args: argparse.Namespace) -> int:
    workloads = choose_workloads(args.workloads, args.image)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in arms:
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    known = {"loopback": Link("loopback", 0, 0), "limited": Link("limited", args.mbit, args.rtt_ms)}
    if args.links == "all":
        names = ["loopback"] if args.quick else ["loopback", "limited"]
    else:
        names = [x.strip() for x in args.links.split(",") if x.strip()]
    if not names or any(name not in known for name in names):
        raise SystemExit(f"--links: expected all or a list of {', '.join(known)}")
    links = [known[name] for name in names]

    images = ensure_layouts(ensure_layer_tars(args.image), args.chunk_size,
                            [a for a in ARMS if a in arms], args.image)
    compile_lazysnap()
    log("image: " + ", ".join(f"{a} {_mb(i.compressed)} MB" for a, i in images.items()))
    stargz_grpc = ensure_stargz_grpc() if any(a in STARGZ_ARMS for a in images) else None
    if stargz_grpc is not None and shutil.which("ctr-remote") is None:
        raise SystemExit("the stargz arm needs ctr-remote (apt-get install stargz-snapshotter)")

    top = Path(tempfile.mkdtemp(prefix="lzb", dir="/tmp"))  # short: unix socket paths
    all_results: list[Result] = []
    tables: list[str] = []
    proxy: LinkProxy | None = None
    try:
        with run_registry(top / "registry") as registry:
            pushed: set[str] = set()
            for arm, image in images.items():
                if arm in PROFILE_ARMS:  # one repository per workload, each profiled apart
                    for workload in workloads:
                        oci.push_layout(image.layout, "latest", f"{registry.host}/"
                                        f"{repository(arm, workload)}:{TAGS[arm]}")
                    continue
                if TAGS[arm] in pushed:  # stargz: the estargz arm's image
                    continue
                pushed.add(TAGS[arm])
                log(f"pushing {arm} image ({_mb(image.compressed)} MB) with skopeo")
                oci.push_layout(image.layout, "latest", f"{registry.host}/{REPOSITORY}:{TAGS[arm]}")
                if arm == "gzip+soci":
                    _soci_index(f"{registry.host}/{REPOSITORY}:{TAGS[arm]}",
                                args.soci_span_size)
            pause = push_pause_image(top / "pause", registry.host) \
                if any(arm in CRI_ARMS for arm in images) else ""
            host, port = registry.host.rsplit(":", 1)
            number = 0
            for link in links:
                proxy = LinkProxy((host, int(port)), mbit=link.mbit, rtt_ms=link.rtt_ms,
                                  lifetime=args.lifetime)
                proxy.start()
                results: list[Result] = []
                try:
                    for workload in workloads:
                        for arm in images:
                            number += 1
                            reference = (f"{proxy.address}/{repository(arm, workload)}:"
                                         f"{TAGS[arm]}")
                            log(f"[{link.name}] {workload} / {arm} ...")
                            workdir = top / f"r{number}"
                            try:
                                if arm in PROFILE_ARMS:
                                    record_profile(
                                        workload, f"{registry.host}/"
                                        f"{repository(arm, workload)}:{TAGS[arm]}",
                                        top / f"p{number}", number, tuple(args.lazy_setting))
                                result = measure(
                                    link.name, workload, arm, images[arm], reference, proxy,
                                    workdir, number,
                                    background_fetch=not args.no_background_fetch,
                                    stargz_grpc=stargz_grpc, pause=pause,
                                    lazy_settings=tuple(args.lazy_setting),
                                    trace=Path(args.trace) / f"{link.name}-{workload}-"
                                    f"{arm.replace(':', '')}.jsonl" if args.trace else None)
                            except Exception as exc:  # one broken arm must not end the run
                                result = Result(link.name, workload, arm, error=repr(exc)[:2000])
                            finally:
                                unmount_under(workdir)
                                if args.keep_logs:
                                    _keep_logs(workdir, args.keep_logs, number, link, workload,
                                               arm)
                                shutil.rmtree(workdir, ignore_errors=True)
                            log(f"    {_brief(result)}")
                            results.append(result)
                finally:
                    proxy.stop()
                    proxy = None
                all_results += results
                note = f" [{args.image} image]" + (" [lazysnap background fetch OFF]"
                                                   if args.no_background_fetch else "") + "".join(
                    f" [lazy] {line}" for line in args.lazy_setting)
                table = render(link, results, images, note)
                tables.append(table)
                print(table, flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        unmount_under(top)
        shutil.rmtree(top, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": [dataclasses.asdict(r) for r in all_results],
             "images": {a: {"compressed": i.compressed, "tar": i.tar_size,
                            "blobs": list(i.blob_sizes)} for a, i in images.items()},
             "image": args.image, "machine": _machine()}, indent=1))
    return 0 if all(r.ok for r in all_results) else 1


def _keep_logs(workdir: Path, dest: str, number: int, link: Link, workload: str,
               arm: str) -> None:
    target = Path(dest) / f"{number:02d}-{link.name}-{workload}-{arm.replace(':', '')}"
    target.mkdir(parents=True, exist_ok=True)
    for source, name in ((workdir / "proxy-requests.tsv", "proxy-requests.tsv"),
                         (workdir / "d" / "lazysnap.log", "lazysnap.log"),
                         (workdir / "s" / "stargz.log", "stargz.log"),
                         (workdir / "c" / "containerd.log", "containerd.log")):
        with contextlib.suppress(OSError):
            shutil.copy(source, target / name)


def _brief(r: Result) -> str:
    if not r.ok:
        return f"FAILED {r.error[:300]}"
    return (f"first output {r.first_output_s:.2f}s ({r.first_line!r}), pull {r.pull_s:.2f}s, "
            f"fetched {_mb(r.fetched_first)} MB in {r.requests_first} requests "
            f"({r.ranges_first} ranges, {_per_range(r)} MiB each), "
            f"whole image local {r.local_s:.2f}s "
            f"({_mb(r.fetched_local)} MB){_ztoc_brief(r)}; {r.pull_summary}")


def _ztoc_brief(r: Result) -> str:
    if not r.ztoc_fetched and not r.ztoc_held_reused:
        return ""
    return (f", blob check fetched {_mb(r.ztoc_fetched)} MB and reused "
            f"{_mb(r.ztoc_held_reused)} MB readers held")


def _machine() -> dict[str, str]:
    return {"cpus": str(os.cpu_count()), "kernel": os.uname().release,
            "python": sys.version.split()[0]}


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every service and unmount."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="loopback only (no limited link)")
    parser.add_argument("--links", default="all",
                        help="all, loopback, limited, or loopback,limited (default: all)")
    parser.add_argument("--workloads", default=None,
                        help=f"comma separated, of {','.join(WORKLOADS)} (default: every "
                        "workload that runs on --image: hello, imports and read-everything "
                        "on the python images, gcc and read-everything on the gcc image)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma separated, of {','.join(ARMS)} "
                        f"(default: {','.join(DEFAULT_ARMS)})")
    parser.add_argument("--mbit", type=float, default=100.0, help="limited link rate")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="limited link RTT")
    parser.add_argument("--image", choices=IMAGES, default=IMAGES[0],
                        help="one-layer: the python root file system as one layer; two-layer: "
                        "the same as two, the base system then python; gcc: a minbase with "
                        "gcc as two layers, the base system then what installing gcc added "
                        "(default: one-layer)")
    parser.add_argument("--soci-span-size", default="4MiB",
                        help="span size of the gzip+soci arm's zTOCs, passed to `lazysnap "
                        "index --span-size` (default: 4MiB, as soci's)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="chunk size of the lazy formats (default: lazysnap's writer)")
    parser.add_argument("--lifetime", type=float, default=7200.0,
                        help="the proxy stops by itself after this many seconds")
    parser.add_argument(
        "--no-background-fetch", action="store_true",
        help="diagnosis: lazysnap daemons run with [lazy] background_fetch = false (on-demand "
        "reads only; 'local' is then never reached and shows nan)")
    parser.add_argument(
        "--lazy-setting", action="append", default=[], metavar="KEY=VALUE",
        help="a [lazy] line for the lazysnap daemons' config, in TOML (repeatable), such as "
        "'exec_prefetch_depth = 0' to compare without exec-aware prefetch")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--trace", metavar="DIR",
                        help="record a `lazysnap trace` of each lazysnap run here, from before "
                        "its pull until its container exited (plot with `lazysnap trace report`)")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="copy each run's lazysnap and containerd logs here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("startup.py needs root (containerd, mounts)", file=sys.stderr)
        return 2
    with _terminate_on_sigterm():
        try:
            return run(args)
        except KeyboardInterrupt:
            print("interrupted; everything started was stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
