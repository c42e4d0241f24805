"""Shared helpers for layer-format tests: sample trees, tars, an in-memory blob, and views of a
tar and of a LayerIndex that can be compared with ``==``. Other test modules may import these.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusefs.formats import decode_chunk, verify_chunk
from fusefs.formats.footer import build_estargz_footer
from fusefs.index import EntryKind, LayerIndex

STDLIB = Path("/usr/lib/python3.11")
MTIME = 1_700_000_000


class MemoryBlob:
    """A BlobReader over bytes that records every read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    async def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise ValueError(f"read {offset}+{length} outside blob of {len(self.data)}")
        return self.data[offset : offset + length]


def build_sample_tree(root: Path, *, seed: int = 4) -> Path:
    """A tree with every kind of entry a layer may carry. Devices need root."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_bytes(b"lazysnap\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(rnd.randbytes(300_000))  # several chunks at small sizes
    (root / "zeros.bin").write_bytes(bytes(200_000))
    mixed = rnd.randbytes(65_536) + bytes(65_536) + rnd.randbytes(10)  # a zero 64 KiB chunk
    (root / "mixed.bin").write_bytes(mixed)
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o4755)  # setuid
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)  # sticky
    (root / "usr" / "bin" / "tool-link").symlink_to("tool")
    (root / "dangling").symlink_to("/nowhere/at/all")
    os.link(tool, root / "usr" / "bin" / "tool-hard")
    os.link(root / "etc" / "hostname", root / "hostname-hard")
    (root / "ünïcødé 名前.txt").write_text("unicode\n", encoding="utf-8")
    (root / "space name").write_bytes(b"x")
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / ("long" * 40)).write_bytes(b"long name\n")
    attrs = root / "with-xattrs"
    attrs.write_bytes(b"xattrs\n")
    os.setxattr(attrs, "user.comment", b"hello")
    os.setxattr(attrs, "user.binary", bytes(range(256))[:64])
    whiteouts = root / "wh"
    whiteouts.mkdir()
    (whiteouts / ".wh.deleted").write_bytes(b"")
    opaque = root / "opaque"
    opaque.mkdir()
    (opaque / ".wh..wh..opq").write_bytes(b"")
    (opaque / "kept").write_bytes(b"kept\n")
    if os.geteuid() == 0:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "loop9", stat.S_IFBLK | 0o660, os.makedev(7, 9))
        os.chown(root / "etc" / "hostname", 1234, 5678)
    os.mkfifo(root / "fifo")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    return root


def copy_stdlib_slice(dest: Path, limit: int = 200) -> Path:
    """Up to ``limit`` files of the stdlib (real-world names and sizes)."""
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for source in sorted(STDLIB.glob("json/**/*")) + sorted(STDLIB.glob("email/**/*")):
        if count >= limit:
            break
        if source.is_file() and not source.is_symlink():
            target = dest / source.relative_to(STDLIB)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            count += 1
    return dest


def gnu_tar(root: Path) -> bytes:
    """The tree as GNU tar writes it (PAX with xattrs, ``./`` names)."""
    return subprocess.run(
        [
            "tar",
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            "--numeric-owner",
            "-C",
            str(root),
            "-cf",
            "-",
            ".",
        ],
        check=True,
        capture_output=True,
    ).stdout


@dataclass(frozen=True)
class Node:
    """What one name in a layer should look like, comparable between tar and index."""

    kind: EntryKind
    mode: int
    uid: int
    gid: int
    size: int
    mtime_s: int
    rdev: int
    target: bytes  # symlink target
    xattrs: tuple[tuple[bytes, bytes], ...]
    content_sha: str
    link_group: str  # the path of the inode's first name (hardlinks share it)


_TAR_KINDS = {
    tarfile.REGTYPE: EntryKind.REG,
    tarfile.AREGTYPE: EntryKind.REG,
    tarfile.DIRTYPE: EntryKind.DIR,
    tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.CHRTYPE: EntryKind.CHAR,
    tarfile.BLKTYPE: EntryKind.BLOCK,
    tarfile.FIFOTYPE: EntryKind.FIFO,
}
_TYPE_BITS = {
    EntryKind.DIR: stat.S_IFDIR,
    EntryKind.REG: stat.S_IFREG,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
}
IGNORED = {".prefetch.landmark", ".no.prefetch.landmark", "stargz.index.json"}


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p and p != ".")


def tar_view(tar_bytes: bytes) -> dict[str, Node]:
    """The layer a tar describes, with overlay whiteouts translated as the index does."""
    nodes: dict[str, Node] = {}
    opaque: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), errors="surrogateescape") as archive:
        for info in archive:
            path = _clean(info.name)
            if path in IGNORED or not path:
                continue
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                opaque.add(parent)
                continue
            if base.startswith(".wh."):
                hidden = f"{parent}/{base[4:]}" if parent else base[4:]
                nodes[hidden] = Node(
                    EntryKind.CHAR,
                    stat.S_IFCHR,
                    info.uid,
                    info.gid,
                    0,
                    int(info.mtime),
                    0,
                    b"",
                    (),
                    "",
                    hidden,
                )
                continue
            if info.islnk():
                nodes[path] = nodes[_clean(info.linkname)]
                continue
            kind = _TAR_KINDS[info.type]
            content = b""
            if kind == EntryKind.REG:
                extracted = archive.extractfile(info)
                assert extracted is not None
                content = extracted.read()
            xattrs = tuple(
                sorted(
                    (k[len("SCHILY.xattr.") :].encode(), v.encode("utf-8", "surrogateescape"))
                    for k, v in info.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            target = info.linkname.encode("utf-8", "surrogateescape") if info.issym() else b""
            nodes[path] = Node(
                kind=kind,
                mode=_TYPE_BITS[kind] | (info.mode & 0o7777),
                uid=info.uid,
                gid=info.gid,
                size=len(content) if kind == EntryKind.REG else len(target),
                mtime_s=int(info.mtime),
                rdev=os.makedev(info.devmajor, info.devminor)
                if info.isdev() and not info.isfifo()
                else 0,
                target=target,
                xattrs=xattrs,
                content_sha=hashlib.sha256(content).hexdigest() if kind == EntryKind.REG else "",
                link_group=path,
            )
    for path in list(nodes) + [f"{d}/.wh..wh..opq" for d in opaque if d]:
        # Directories a tar implies without a member of their own, as the index creates them.
        parent = path.rpartition("/")[0]
        while parent and parent not in nodes:
            nodes[parent] = Node(
                EntryKind.DIR, stat.S_IFDIR | 0o755, 0, 0, 0, 0, 0, b"", (), "", parent
            )
            parent = parent.rpartition("/")[0]
    for path in opaque - {""}:  # the root's attributes are not part of the view
        node = nodes[path]
        xattrs = tuple(sorted((*node.xattrs, (b"trusted.overlay.opaque", b"y"))))
        nodes[path] = Node(**{**node.__dict__, "xattrs": xattrs})
    return nodes


def read_file(index: LayerIndex, blob: bytes, entry: int) -> bytes:
    """A regular file's content rebuilt from its chunks, each verified."""
    parts = []
    expected = 0
    for ref in index.chunks(entry):
        assert ref.file_offset == expected
        data = decode_chunk(index.codec, blob[ref.blob_offset : ref.blob_end], ref)
        verify_chunk(ref, data)
        parts.append(data)
        expected += ref.size
    return b"".join(parts)


def walk(index: LayerIndex, directory: int = 0, prefix: str = "") -> Iterator[tuple[str, int]]:
    for name, entry in index.children(directory):
        path = prefix + name.decode("utf-8", "surrogateescape")
        yield path, entry
        if index.attr(entry).kind == EntryKind.DIR:
            yield from walk(index, entry, path + "/")


def index_view(
    index: LayerIndex,
    blob: bytes,
    read: Callable[[LayerIndex, bytes, int], bytes] = read_file,
) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for path, entry in walk(index):
        attr = index.attr(entry)
        content = read(index, blob, entry) if attr.kind == EntryKind.REG else b""
        if attr.kind == EntryKind.REG:
            assert len(content) == attr.size
        target = index.readlink(entry) if attr.kind == EntryKind.SYMLINK else b""
        nodes[path] = Node(
            kind=attr.kind,
            mode=attr.mode,
            uid=attr.uid,
            gid=attr.gid,
            size=attr.size,
            mtime_s=attr.mtime_ns // 1_000_000_000,
            rdev=attr.rdev,
            target=target,
            xattrs=tuple(sorted(index.xattrs(entry).items())),
            content_sha=hashlib.sha256(content).hexdigest() if attr.kind == EntryKind.REG else "",
            link_group=index.path(entry),
        )
    return nodes


def decompress_gzip_stream(blob: bytes) -> bytes:
    """gunzip of concatenated members (what ``gzip -d`` does)."""
    out = []
    pending = blob
    while pending:
        inflater = zlib.decompressobj(wbits=31)
        out.append(inflater.decompress(pending))
        out.append(inflater.flush())
        if not inflater.eof:
            raise ValueError("truncated gzip member")
        pending = inflater.unused_data
    return b"".join(out)


def decompress_zstd_stream(blob: bytes) -> bytes:
    """``zstd -d`` of a blob (skippable frames are ignored)."""
    return subprocess.run(
        ["zstd", "-d", "-c", "-q"], input=blob, check=True, capture_output=True
    ).stdout


# --- hand-made blobs for hostile-input tests ------------------------------------------------


def gzip_member(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def estargz_blob(
    entries: list[Mapping[str, Any]] | None = None,
    *,
    payload: bytes = b"",
    document: Any = None,
    raw_json: bytes | None = None,
) -> bytes:
    """An eStargz blob with the given TOC and payload area (not checked for consistency)."""
    if raw_json is None:
        if document is None:
            document = {"version": 1, "entries": list(entries or [])}
        raw_json = json.dumps(document).encode()
    header = tarfile.TarInfo("stargz.index.json")
    header.size = len(raw_json)
    toc_tar = (
        header.tobuf(tarfile.USTAR_FORMAT) + raw_json + bytes(-len(raw_json) % 512) + bytes(1024)
    )
    toc_offset = len(payload)
    return payload + gzip_member(toc_tar) + build_estargz_footer(toc_offset)


def legacy_estargz_footer(toc_offset: int) -> bytes:
    """The 47-byte footer of early stargz: XLEN 22, extra = "%016xSTARGZ", no subfield header."""
    extra = b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + struct.pack("<H", len(extra))
    return header + extra + b"\x01\x00\x00\xff\xff" + b"\0" * 8


def payload_members(*contents: bytes) -> tuple[bytes, list[int]]:
    """Concatenated gzip members and their offsets, for hand-made TOCs."""
    blob = gzip_member(b"\0" * 512)  # stands in for the first tar header
    offsets = []
    for content in contents:
        offsets.append(len(blob))
        blob += gzip_member(content)
    return blob, offsets


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_layout(root: Path, layer_tar: bytes, layer_blob: bytes | None = None) -> None:
    """A one-layer OCI image layout (tag ``t``) whose layer is ``layer_blob``, by default
    ``layer_tar`` gzipped. The media type always says gzip and the diff ID is ``layer_tar``'s:
    right for an eStargz blob, and not checked by ``ctr images import --no-unpack`` for others."""

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / "sha256" / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    blob = zlib.compress(layer_tar, wbits=31) if layer_blob is None else layer_blob
    layer, layer_size = put(blob)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]},
        "config": {},
    }
    config_digest, config_size = put(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer,
                "size": layer_size,
            }
        ],
    }
    manifest_digest, manifest_size = put(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
