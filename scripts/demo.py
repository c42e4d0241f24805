#!/usr/bin/env python3
"""The main job end to end: registry, lazysnap and containerd on this machine; an image with an
eStargz, a zstd:chunked and a plain gzip layer is pushed, pulled with `lazysnap pull` (the
seekable layers are mounted lazily over FUSE, the gzip one is downloaded) and run with runc.
Everything started here is stopped before it exits.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import oci_image as oci  # noqa: E402
from tests.support.containerd import RunningContainerd, run_containerd  # noqa: E402
from tests.support.daemon import running_daemon  # noqa: E402
from tests.support.docker_registry import RunningRegistry, run_registry  # noqa: E402

LAZYSNAP = str(REPO / ".venv" / "bin" / "lazysnap")
STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
_WRITTEN = re.compile(r'http\.request\.method=GET .*http\.request\.uri="?(\S+?)"? .*'
                      r'http\.response\.written=(\d+)')


def step(message: str) -> float:
    print(f"--> {message}", flush=True)
    return time.monotonic()


def done(started: float, detail: str = "") -> None:
    print(f"    ok in {time.monotonic() - started:.2f}s {detail}".rstrip(), flush=True)


def blob_bytes_served(registry: RunningRegistry) -> int:
    """Bytes of layer blobs the registry sent, from its own access log."""
    return sum(
        int(match.group(2))
        for match in map(_WRITTEN.search, registry.log().splitlines())
        if match and "/blobs/" in match.group(1)
    )


def stdlib_tar(limit_bytes: int = 40 << 20) -> bytes:
    """A real tree: part of this Python's standard library (a few thousand files)."""
    builder = oci.TarBuilder().dir("usr").dir("usr/lib").dir("usr/lib/python3")
    total = 0
    for path in sorted(STDLIB.rglob("*")):
        rel = "usr/lib/python3/" + str(path.relative_to(STDLIB))
        if "__pycache__" in rel or "site-packages" in rel or path.is_symlink():
            continue
        if path.is_dir():
            builder.dir(rel)
        elif path.is_file() and total < limit_bytes:
            data = path.read_bytes()
            total += len(data)
            builder.file(rel, data)
    return builder.tar()


def build_and_push(workdir: Path, registry: RunningRegistry) -> tuple[str, list[oci.Layer]]:
    layers = [
        oci.seekable_layer(oci.busybox_tar(), "estargz"),
        oci.seekable_layer(stdlib_tar(), "zstd:chunked"),
        oci.gzip_layer(oci.TarBuilder().dir("etc").file(
            "etc/motd", b"hello from a container started lazily by lazysnap\n").tar()),
    ]
    oci.write_layout(workdir / "image", layers)
    reference = f"{registry.host}/demo/app:latest"
    oci.push_layout(workdir / "image", "latest", reference)
    return reference, layers


def show_snapshots(containerd: RunningContainerd) -> None:
    listing = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout.splitlines()
    print("--> ctr snapshots --snapshotter lazysnap info (labels of each committed layer):")
    for line in listing[1:]:
        name = line.split()[0]
        info = json.loads(containerd.ctr("snapshots", "--snapshotter", "lazysnap", "info",
                                         name).stdout)
        labels = info.get("Labels") or {}
        kind = "remote (lazy, FUSE)" if labels.get("containerd.io/snapshot/remote") else "local"
        print(f"    {name[:19]}...  {kind}")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="lzdemo", dir="/tmp"))
    # Background fetch would pull the rest of each layer within a second on loopback; it is off
    # here so that the bytes below show what the container itself needed.
    config = workdir / "lazysnap.toml"
    config.write_text("[lazy]\nbackground_fetch = false\n")
    try:
        t = step("starting docker-registry on 127.0.0.1")
        with run_registry(workdir / "registry") as registry:
            done(t, registry.url)
            t = step("starting lazysnap serve (proxy snapshotter, FUSE at <root>/fuse)")
            with running_daemon(workdir / "lazysnap", extra_args=["--config", str(config)]) \
                    as daemon:
                done(t, f"socket {daemon.address}")
                t = step("starting containerd 1.6 with [proxy_plugins.lazysnap]")
                with run_containerd(workdir / "containerd", daemon.address) as containerd:
                    done(t)
                    t = step("building an image: busybox (eStargz) + Python stdlib "
                             "(zstd:chunked) + /etc/motd (gzip); pushing it with skopeo")
                    reference, layers = build_and_push(workdir, registry)
                    size = sum(len(layer.blob) for layer in layers)
                    done(t, f"{reference}, {size / 1e6:.1f} MB compressed")
                    before = blob_bytes_served(registry)

                    t = step(f"lazysnap pull {reference}")
                    pulled = subprocess.run(
                        [LAZYSNAP, "pull", "--address", str(containerd.address), "--namespace",
                         containerd.namespace, "--snapshotter", "lazysnap",
                         "--snapshotter-address", str(daemon.address), reference],
                        capture_output=True, text=True, timeout=300, check=True,
                    )
                    done(t)
                    print("    " + pulled.stdout.strip().replace("\n", "\n    "))
                    t = step("ctr run --rm --snapshotter lazysnap ... cat /etc/motd "
                             "and run a module of the lazily mounted stdlib")
                    out = containerd.ctr(
                        "run", "--rm", "--snapshotter", "lazysnap", reference, "demo",
                        "/bin/sh", "-c",
                        "cat /etc/motd; wc -c /usr/lib/python3/abc.py",
                    ).stdout
                    done(t)
                    print("    container said: " + out.strip().replace("\n", "\n    "))
                    fetched = blob_bytes_served(registry) - before
                    print(f"--> layer bytes fetched from the registry: {fetched / 1e6:.2f} MB "
                          f"of {size / 1e6:.1f} MB ({100 * fetched / size:.1f}%): the TOCs, "
                          "busybox (the shell reads it whole), the gzip layer, and the range "
                          "around abc.py (neighbouring small files are fetched together)")
                    show_snapshots(containerd)
                    status = subprocess.run(
                        [LAZYSNAP, "status", "--address", str(daemon.address)],
                        capture_output=True, text=True, check=True, timeout=30,
                    ).stdout.strip()
                    print(f"--> lazysnap status: {status}")
        print("--> stopped containerd, lazysnap and the registry")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
