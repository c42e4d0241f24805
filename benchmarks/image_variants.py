"""Image variants for benchmarks/startup.py that are built from its cached root file system.

* ``split_python``: the root file system as two layer tars, the base system then python, as an
  image built ``FROM debian`` + ``RUN apt-get install python3`` would be layered;
* ``changed_members`` + ``split_layers``: a root file system as two layer tars, what a snapshot
  of the base system already held then what changed after it (the gcc image: the base system,
  then what ``apt-get install gcc libc6-dev`` added or changed);
* ``convert_with_ctr_remote``: an OCI layout converted to eStargz by stargz-snapshotter's own
  ``ctr-remote image convert --estargz --oci`` (its defaults) in a throwaway containerd, so
  lazysnap is measured on eStargz blobs it did not write.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.containerd import run_containerd  # noqa: E402

# What `apt-get install python3` adds to a bookworm minbase: the interpreter, its standard
# library and Debian's python helpers. Member names are matched without their leading "./".
PYTHON_PATHS = re.compile(
    r"^(usr/lib/python3[^/]*|usr/bin/python3[^/]*|usr/share/python3[^/]*"
    r"|usr/lib/[^/]+-linux-gnu/libpython3[^/]*)(/|$)"
)
CONVERT_TIMEOUT = 1800.0


def is_python_path(name: str) -> bool:
    return PYTHON_PATHS.match(name.removeprefix("./")) is not None


def split_python(rootfs_tar: Path, base_tar: Path, python_tar: Path) -> tuple[int, int]:
    """``split_layers`` with python's paths in the second layer."""
    return split_layers(rootfs_tar, base_tar, python_tar, is_python_path)


def split_layers(rootfs_tar: Path, base_tar: Path, upper_tar: Path,
                 in_upper: Callable[[str], bool]) -> tuple[int, int]:
    """Write the members of ``rootfs_tar`` to ``upper_tar`` when ``in_upper(member name)``,
    else to ``base_tar``, in their order (so the split is deterministic); returns how many
    members each got. A hard link goes where its target went: a layer cannot link to a file
    of another layer."""
    placed: dict[str, bool] = {}  # member name -> went to the upper layer
    counts = [0, 0]
    with tarfile.open(rootfs_tar) as source, \
            tarfile.open(base_tar, "w", format=tarfile.PAX_FORMAT) as base, \
            tarfile.open(upper_tar, "w", format=tarfile.PAX_FORMAT) as upper:
        for member in source:
            if member.islnk():
                to_upper = placed.get(member.linkname, in_upper(member.linkname))
            else:
                to_upper = in_upper(member.name)
            placed[member.name] = to_upper
            data = source.extractfile(member) if member.isreg() else None
            (upper if to_upper else base).addfile(member, data)
            counts[to_upper] += 1
    return counts[0], counts[1]


def _member_state(member: tarfile.TarInfo, data: bytes | None) -> tuple[object, ...]:
    """What a layer diff compares: type, ownership, mode, mtime, link target, extended
    attributes and content."""
    xattrs = sorted((k, v) for k, v in member.pax_headers.items() if k.startswith("SCHILY."))
    content = hashlib.sha256(data).hexdigest() if data is not None else ""
    return (member.type, member.uid, member.gid, member.mode, int(member.mtime),
            member.linkname, member.devmajor, member.devminor, tuple(xattrs), content)


def _states(tar_path: Path) -> dict[str, tuple[object, ...]]:
    states: dict[str, tuple[object, ...]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            reader = tar.extractfile(member) if member.isreg() else None
            data = reader.read() if reader is not None else None
            states[_name(member.name)] = _member_state(member, data)
    return states


def _name(member_name: str) -> str:
    return member_name.removeprefix("./").rstrip("/") or "."


def changed_members(before_tar: Path, after_tar: Path) -> frozenset[str]:
    """The member names of ``after_tar`` (without a leading ``./``) that ``before_tar`` lacks
    or holds in another state, with their parent directories: what a layer built on top of
    ``before_tar`` holds, as containerd's diff writes it. Deletions are left out: a layer
    split from ``after_tar`` simply does not have them."""
    before = _states(before_tar)
    changed: set[str] = set()
    for name, state in _states(after_tar).items():
        if before.get(name) != state:
            changed.add(name)
            parts = name.split("/")
            changed.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    return frozenset(changed)


def split_changed(rootfs_tar: Path, changed: frozenset[str], base_tar: Path,
                  upper_tar: Path) -> tuple[int, int]:
    """``split_layers`` with the ``changed`` member names (see ``changed_members``) in the
    second layer."""
    return split_layers(rootfs_tar, base_tar, upper_tar, lambda name: _name(name) in changed)


def convert_with_ctr_remote(source_layout: Path, dest: Path, workdir: Path) -> None:
    """``ctr-remote image convert --estargz --oci`` of the image in ``source_layout`` (tag
    ``latest``), with ctr-remote's defaults (4 MiB chunks, compression level 9, no prioritized
    files), exported to the OCI layout ``dest`` under the tag ``latest``."""
    if shutil.which("ctr-remote") is None:
        raise RuntimeError("ctr-remote is missing (apt-get install stargz-snapshotter)")
    work = Path(tempfile.mkdtemp(prefix="conv", dir=workdir))
    try:
        archive = work / "in.tar"
        subprocess.run(["tar", "-C", str(source_layout), "-cf", str(archive), "."], check=True,
                       timeout=CONVERT_TIMEOUT)
        # Nobody listens on the lazysnap socket: only the content store is used.
        with run_containerd(work / "c", work / "none.sock") as containerd:
            def ctr(*args: str, tool: str = "ctr") -> None:
                command = [tool, "--address", str(containerd.address), "--namespace",
                           containerd.namespace, *args]
                done = subprocess.run(command, capture_output=True, text=True,
                                      timeout=CONVERT_TIMEOUT, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")

            ctr("images", "import", "--no-unpack", "--base-name", "bench/source", str(archive))
            ctr("image", "convert", "--estargz", "--oci", "bench/source:latest",
                "bench/converted:latest", tool="ctr-remote")
            ctr("images", "export", str(work / "out.tar"), "bench/converted:latest")
        exported = work / "out"
        exported.mkdir()
        subprocess.run(["tar", "-C", str(exported), "-xf", str(work / "out.tar")], check=True,
                       timeout=CONVERT_TIMEOUT)
        _retag_latest(exported)
        dest.parent.mkdir(parents=True, exist_ok=True)
        exported.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _retag_latest(layout: Path) -> None:
    """Leave one manifest in index.json, named ``latest`` (what skopeo's oci: transport and
    startup.py look up); ctr's export names it after the image."""
    index = json.loads((layout / "index.json").read_text())
    manifests = index["manifests"]
    if len(manifests) != 1 or not manifests[0]["mediaType"].endswith("manifest.v1+json"):
        raise RuntimeError(f"expected one image manifest in the export, got {manifests}")
    manifests[0]["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps(index))
