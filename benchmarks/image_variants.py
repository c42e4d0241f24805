"""Image variants for benchmarks/startup.py that are built from its cached root file system.

* ``split_python``: the root file system as two layer tars, the base system then python, as an
  image built ``FROM debian`` + ``RUN apt-get install python3`` would be layered;
* ``convert_with_ctr_remote``: an OCI layout converted to eStargz by stargz-snapshotter's own
  ``ctr-remote image convert --estargz --oci`` (its defaults) in a throwaway containerd, so
  lazysnap is measured on eStargz blobs it did not write.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
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
    """Write the members of ``rootfs_tar`` to ``base_tar`` or ``python_tar``, in their order
    (so the split is deterministic); returns how many members each got. A hard link goes
    where its target went: a layer cannot link to a file of another layer."""
    placed: dict[str, bool] = {}  # member name -> went to the python layer
    counts = [0, 0]
    with tarfile.open(rootfs_tar) as source, \
            tarfile.open(base_tar, "w", format=tarfile.PAX_FORMAT) as base, \
            tarfile.open(python_tar, "w", format=tarfile.PAX_FORMAT) as python:
        for member in source:
            if member.islnk():
                to_python = placed.get(member.linkname, is_python_path(member.linkname))
            else:
                to_python = is_python_path(member.name)
            placed[member.name] = to_python
            data = source.extractfile(member) if member.isreg() else None
            (python if to_python else base).addfile(member, data)
            counts[to_python] += 1
    return counts[0], counts[1]


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
