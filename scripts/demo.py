#!/usr/bin/env python3
"""The main job end to end: registry, lazysnap and containerd on this machine, an image pushed,
pulled through lazysnap and run with runc. Everything started here is stopped before it exits.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import oci_image as oci  # noqa: E402
from tests.support.containerd import run_containerd  # noqa: E402
from tests.support.daemon import running_daemon  # noqa: E402
from tests.support.docker_registry import run_registry  # noqa: E402


def step(message: str) -> float:
    print(f"--> {message}", flush=True)
    return time.monotonic()


def done(started: float, detail: str = "") -> None:
    print(f"    ok in {time.monotonic() - started:.2f}s {detail}".rstrip(), flush=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="lzdemo", dir="/tmp"))
    try:
        t = step("starting docker-registry on 127.0.0.1")
        with run_registry(workdir / "registry") as registry:
            done(t, registry.url)
            t = step("starting lazysnap serve (proxy snapshotter)")
            with running_daemon(workdir / "lazysnap") as daemon:
                done(t, f"socket {daemon.address}")
                t = step("starting containerd 1.6 with [proxy_plugins.lazysnap]")
                with run_containerd(workdir / "containerd", daemon.address) as containerd:
                    done(t)
                    t = step("building a busybox image (2 layers) and pushing it with skopeo")
                    layers = [
                        oci.gzip_layer(oci.busybox_tar()),
                        oci.gzip_layer(oci.TarBuilder().dir("etc").file(
                            "etc/motd", b"hello from a container run through lazysnap\n").tar()),
                    ]
                    oci.write_layout(workdir / "image", layers)
                    reference = f"{registry.host}/demo/busybox:latest"
                    oci.push_layout(workdir / "image", "latest", reference)
                    size = sum(len(layer.blob) for layer in layers)
                    done(t, f"{reference} ({size / 1e6:.1f} MB compressed)")

                    t = step(f"ctr image pull --snapshotter lazysnap {reference}")
                    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "lazysnap",
                                   reference)
                    done(t)
                    t = step("ctr run --snapshotter lazysnap ... cat /etc/motd")
                    out = containerd.ctr("run", "--rm", "--snapshotter", "lazysnap", reference,
                                         "demo", "/bin/cat", "/etc/motd").stdout
                    done(t)
                    print(f"    container said: {out.strip()}")
                    print("--> snapshots in lazysnap (ctr snapshots --snapshotter lazysnap ls):")
                    listing = containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls")
                    print("    " + listing.stdout.strip().replace("\n", "\n    "))
                    status = json.loads(
                        __import__("subprocess").run(
                            [str(REPO / ".venv/bin/lazysnap"), "status", "--json",
                             "--address", str(daemon.address)],
                            capture_output=True, text=True, check=True, timeout=30,
                        ).stdout
                    )
                    print(f"--> lazysnap status: {json.dumps(status)}")
                    print("NOTE: layers are still downloaded by containerd (ordinary snapshots);"
                          " lazy pulling over FUSE is being built (see CHANGELOG.md).")
        print("--> stopped containerd, lazysnap and the registry")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
