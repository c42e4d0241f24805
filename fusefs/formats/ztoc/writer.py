"""Build a SOCI zTOC for a gzip layer blob, leaving the blob untouched.

One pass inflates the blob with ``inflate(Z_BLOCK)`` (the system zlib, which reports every
deflate block boundary and how many bits of the current byte belong to the next block) and
records a checkpoint at the first boundary past every ``span_size`` uncompressed bytes, as
soci does. The same pass hashes each span's compressed bytes, so the blob is read once (it may
be a registry download or a content store file). The uncompressed tar goes to a spool file
whose headers give the file table.
"""

from __future__ import annotations

import contextlib
import ctypes
import decimal
import hashlib
import tarfile
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, cast

from fusefs.formats.modtime import format_modtime
from fusefs.formats.tarscan import TarMember, scan_members
from fusefs.formats.ztoc.checkpoints import WINDOW_SIZE, Checkpoint, SpanTable, pack_checkpoints
from fusefs.formats.ztoc.encode import ZtocFile, encode_ztoc
from fusefs.formats.ztoc.zlib_binding import (
    END_OF_BLOCK,
    LAST_BLOCK,
    UNUSED_BITS,
    Z_BLOCK,
    Z_STREAM_END,
    Inflater,
    ZlibError,
)

DEFAULT_SPAN_SIZE = 4 * 1024 * 1024
DEFAULT_BUILD_TOOL = "lazysnap"
_READ = 1 << 16
_OUT = 1 << 17
_SPOOL_MAX = 64 * 1024 * 1024
_TAR_END = 2 * 512  # the two zero blocks that end a tar archive
_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


class ZtocBuildError(ValueError):
    """The blob is not a gzip-compressed tar this writer can index."""


@dataclass(frozen=True, slots=True)
class ZtocBuild:
    data: bytes  # the serialized zTOC
    digest: str  # sha256 of ``data``
    spans: int
    entries: int
    compressed_size: int
    uncompressed_size: int


def build_ztoc(
    blob: BinaryIO,
    *,
    span_size: int = DEFAULT_SPAN_SIZE,
    build_tool: str = DEFAULT_BUILD_TOOL,
) -> ZtocBuild:
    """Index the gzip layer in the seekable ``blob`` (read from its start)."""
    if span_size <= 0:
        raise ValueError("span_size must be positive")
    with contextlib.ExitStack() as stack:
        spool = cast(BinaryIO, stack.enter_context(tempfile.SpooledTemporaryFile(_SPOOL_MAX)))
        blob.seek(0)
        hashes = _SpanHashes()
        points, compressed_size = find_checkpoints(blob, span_size, spool, hashes)
        table = SpanTable(span_size, points, compressed_size)
        digests = hashes.digests
        try:
            members, tar_end = scan_members(spool)
        except (tarfile.TarError, ValueError) as exc:
            raise ZtocBuildError(f"the layer is not a readable tar: {exc}") from exc
        total = spool.seek(0, 2)
    uncompressed_size = min(tar_end + _TAR_END, total)
    data = encode_ztoc(
        files=[_describe(member) for member in members],
        checkpoints=pack_checkpoints(table.span_size, table.checkpoints),
        span_digests=digests,
        max_span_id=len(table) - 1,
        build_tool=build_tool,
        compressed_size=compressed_size,
        uncompressed_size=uncompressed_size,
    )
    return ZtocBuild(
        data=data,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        spans=len(points),
        entries=len(members),
        compressed_size=compressed_size,
        uncompressed_size=uncompressed_size,
    )


def find_checkpoints(
    blob: BinaryIO, span_size: int, sink: BinaryIO, hashes: _SpanHashes | None = None
) -> tuple[list[Checkpoint], int]:
    """Inflate ``blob`` into ``sink``; the checkpoints and the blob's size. ``hashes``, when
    given, gets each span's digest, in span order.

    A checkpoint goes at the end of the first gzip header and then at the first block end
    more than ``span_size`` bytes past the previous one, never after a member's last block.
    """
    spans = hashes if hashes is not None else _SpanHashes()
    points: list[Checkpoint] = []
    window = bytearray()  # the last WINDOW_SIZE bytes of output
    out = ctypes.create_string_buffer(_OUT)
    total_in = total_out = last = 0
    ended = False
    try:
        with Inflater(31) as inflater:
            while piece := blob.read(_READ):
                spans.add(total_in, piece)
                if ended:  # another gzip member follows (pigz, concatenated layers)
                    inflater.reset(31)
                    ended = False
                inflater.feed(piece)
                while inflater.avail_in and not ended:
                    before = inflater.avail_in
                    code, count = inflater.inflate_into(out, 0, Z_BLOCK)
                    total_in += before - inflater.avail_in
                    if count:
                        produced = out.raw[:count]
                        sink.write(produced)
                        window += produced
                        del window[:-WINDOW_SIZE]
                        total_out += count
                    ended = code == Z_STREAM_END
                    if ended and inflater.avail_in:
                        inflater.reset(31)
                        ended = False
                        continue
                    state = inflater.data_type
                    if (
                        state & END_OF_BLOCK
                        and not state & LAST_BLOCK
                        and (total_out == 0 or total_out - last > span_size)
                    ):
                        padded = bytes(WINDOW_SIZE - len(window)) + bytes(window)
                        points.append(Checkpoint(total_in, total_out, state & UNUSED_BITS, padded))
                        spans.cut(points[-1])
                        last = total_out
                    if before == inflater.avail_in and not count:
                        break
    except ZlibError as exc:
        raise ZtocBuildError(f"the layer is not valid gzip: {exc}") from exc
    if not ended or not points:
        raise ZtocBuildError("the gzip stream is truncated")
    spans.finish(total_in)
    return points, total_in


class _SpanHashes:
    """sha256 of each span's compressed bytes, fed while the blob is inflated.

    Span ``i`` is ``[points[i].fetch_offset, points[i + 1].compressed_offset)``, the last one
    running to the end of the blob (``SpanTable.compressed_range``). Bytes are hashed once no
    checkpoint can fall before them: a checkpoint is found only at what was consumed. Only the
    last hashed byte is kept, the partial byte a span with bits starts with.
    """

    def __init__(self) -> None:
        self.digests: list[str] = []
        self._hasher: hashlib._Hash | None = None  # None before the first checkpoint
        self._pending = bytearray()  # read, not hashed yet
        self._pending_at = 0  # blob offset of ``_pending[0]``
        self._last = b""  # the byte before ``_pending_at``

    def add(self, consumed: int, piece: bytes) -> None:
        """The next ``piece`` read from the blob; ``consumed`` bytes are inflated so far."""
        self._feed_to(consumed)
        self._pending += piece

    def cut(self, point: Checkpoint) -> None:
        """A span starts at ``point``: the one before it ends at its first whole byte."""
        self._feed_to(point.compressed_offset)
        if self._hasher is not None:
            self.digests.append("sha256:" + self._hasher.hexdigest())
        self._hasher = hashlib.sha256()
        if point.bits:
            self._hasher.update(self._last)

    def finish(self, end: int) -> None:
        self._feed_to(end)
        if self._hasher is not None:
            self.digests.append("sha256:" + self._hasher.hexdigest())
            self._hasher = None

    def _feed_to(self, offset: int) -> None:
        count = min(max(offset - self._pending_at, 0), len(self._pending))
        if not count:
            return
        if self._hasher is not None:
            self._hasher.update(memoryview(self._pending)[:count])
        self._last = bytes(self._pending[count - 1 : count])
        del self._pending[:count]
        self._pending_at += count


def _mtime_ns(info: tarfile.TarInfo) -> int:
    exact = info.pax_headers.get("mtime")
    if exact is not None:
        with contextlib.suppress(decimal.InvalidOperation):
            return int(decimal.Decimal(exact) * 1_000_000_000)
    return int(info.mtime) * 1_000_000_000


def _describe(member: TarMember) -> ZtocFile:
    info = member.info
    typ = _TYPES.get(info.type)
    if typ is None:
        raise ZtocBuildError(f"tar member {info.name!r} has unsupported type {info.type!r}")
    return ZtocFile(
        # tarfile drops a directory name's trailing slash; the tar (and soci) keep it.
        name=info.name + ("/" if typ == "dir" and not info.name.endswith("/") else ""),
        type=typ,
        offset=member.data_start,
        size=member.data_size,
        linkname=info.linkname,
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        uname=info.uname,
        gname=info.gname,
        mod_time=format_modtime(_mtime_ns(info)),
        devmajor=info.devmajor,
        devminor=info.devminor,
        pax=tuple(sorted(info.pax_headers.items())),
    )
