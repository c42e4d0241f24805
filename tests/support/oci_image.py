"""Build small OCI images in a test (layers as tar bytes) and push them with skopeo.

The images are real OCI image layouts; skopeo (a real client) pushes them to the real registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fusefs.formats import write_estargz, write_zstd_chunked

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "wc", "sha256sum", "find", "sleep", "true", "stat")
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    blob: bytes  # as stored in the registry (compressed)
    diff_id: str  # digest of the uncompressed tar
    media_type: str = MEDIA_LAYER_GZIP
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        return sha256(self.blob)


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_700_000_000
    return info


class TarBuilder:
    """A deterministic tar written in memory."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)

    def dir(self, name: str, mode: int = 0o755) -> TarBuilder:
        self._tar.addfile(_info(name, tarfile.DIRTYPE, mode))
        return self

    def file(self, name: str, data: bytes, mode: int = 0o644) -> TarBuilder:
        info = _info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> TarBuilder:
        info = _info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._tar.addfile(info)
        return self

    def whiteout(self, name: str) -> TarBuilder:
        head, _, base = name.rpartition("/")
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"")

    def tar(self) -> bytes:
        self._tar.close()
        return self._buffer.getvalue()


def gzip_layer(tar: bytes) -> Layer:
    return Layer(blob=gzip.compress(tar, mtime=0), diff_id=sha256(tar))


def busybox_tar() -> bytes:
    builder = TarBuilder().dir("bin").dir("etc").dir("tmp", 0o1777)
    builder.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        builder.symlink(f"bin/{applet}", "busybox")
    return builder.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n").tar()


def write_layout(
    dest: Path, layers: Sequence[Layer], *, tag: str = "latest", cmd: Sequence[str] = ("/bin/sh",),
    volumes: Sequence[str] = (), user: str = "",
) -> str:
    """Write an OCI image layout at ``dest``; return the manifest digest. ``volumes``: the
    image's VOLUME paths; ``user``: its USER."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "amd64"),
        "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"],
                   **({"Volumes": {v: {} for v in volumes}} if volumes else {}),
                   **({"User": user} if user else {})},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": put(layer.blob),
                "size": len(layer.blob),
                **({"annotations": dict(layer.annotations)} if layer.annotations else {}),
            }
            for layer in layers
        ],
    }
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = put(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest


def push_layout(layout: Path, tag: str, reference: str) -> None:
    """Push with skopeo to a plain-HTTP loopback registry."""
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci:{layout}:{tag}", f"docker://{reference}"],
        check=True, capture_output=True, timeout=120,
    )


MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def seekable_layer(tar: bytes, fmt: str, **writer_options: object) -> Layer:
    """Convert a layer tar with lazysnap's own writer (eStargz or zstd:chunked)."""
    out = io.BytesIO()
    writer = write_estargz if fmt == "estargz" else write_zstd_chunked
    result = writer(io.BytesIO(tar), out, **writer_options)  # type: ignore[arg-type]
    media_type = MEDIA_LAYER_GZIP if fmt == "estargz" else MEDIA_LAYER_ZSTD
    return Layer(
        blob=out.getvalue(),
        diff_id=result.diff_id,
        media_type=media_type,
        annotations=tuple(sorted(result.annotations.items())),
    )
