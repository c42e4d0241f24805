"""Read an input layer tar as raw pieces for the writers: each member's header bytes exactly as
in the input, PAX/GNU extension headers included; its payload position; and the tail after the
last member. Copying raw bytes keeps the output tar byte-identical to the input."""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

import zstandard

BLOCK = 512
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SPOOL_MAX = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TarMember:
    info: tarfile.TarInfo
    header_start: int  # first byte of the member's header blocks in the input
    data_start: int  # first byte of the payload
    data_size: int  # payload bytes (excluding padding)
    end: int  # one past the padded payload: where the next member starts

    @property
    def path(self) -> str:
        return self.info.name


@contextlib.contextmanager
def seekable_tar(tar_in: BinaryIO) -> Iterator[BinaryIO]:
    """A seekable, uncompressed view of ``tar_in``; gzip or zstd input is decompressed.

    The caller's stream is used as is when it is a seekable plain tar; otherwise the
    decompressed content is spooled to a temporary file, closed on exit.
    """
    with contextlib.ExitStack() as stack:
        if not _is_seekable(tar_in):
            raw = stack.enter_context(_spool())
            shutil.copyfileobj(tar_in, raw)
            raw.seek(0)
            tar_in = raw
        start = tar_in.tell()
        magic = tar_in.read(4)
        tar_in.seek(start)
        if magic.startswith(_GZIP_MAGIC):
            plain = stack.enter_context(_spool())
            _gunzip_into(tar_in, plain)
        elif magic == _ZSTD_MAGIC:
            plain = stack.enter_context(_spool())
            reader = zstandard.ZstdDecompressor().stream_reader(tar_in, read_across_frames=True)
            shutil.copyfileobj(reader, plain)
        else:
            yield tar_in
            return
        plain.seek(0)
        yield plain


def _spool() -> BinaryIO:
    return cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=_SPOOL_MAX))


def _is_seekable(stream: BinaryIO) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError):
        return False


def _gunzip_into(src: BinaryIO, dst: BinaryIO) -> None:
    inflater = zlib.decompressobj(wbits=31)
    while block := src.read(1 << 20):
        while block:
            dst.write(inflater.decompress(block))
            if inflater.eof:  # concatenated members
                block = inflater.unused_data
                inflater = zlib.decompressobj(wbits=31)
            else:
                block = b""
    dst.write(inflater.flush())


def scan_members(source: BinaryIO) -> tuple[list[TarMember], int]:
    """The members of a seekable tar and the offset where its end-of-archive tail starts."""
    source.seek(0)
    members: list[TarMember] = []
    end = 0
    with tarfile.open(
        fileobj=source, mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for info in archive:
            if info.issparse():
                raise ValueError(f"sparse tar member {info.name!r} is not supported")
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                continue
            data_size = info.size if info.isreg() else 0
            if info.offset < end:
                raise ValueError(f"tar member {info.name!r} overlaps the previous one")
            # Bytes tarfile consumed before the member's own headers, such as a global PAX
            # header, belong to it, so that copying members in order reproduces the input.
            header_start = end
            end = info.offset_data + -(-data_size // BLOCK) * BLOCK
            members.append(
                TarMember(
                    info=info,
                    header_start=header_start,
                    data_start=info.offset_data,
                    data_size=data_size,
                    end=end,
                )
            )
    return members, end


def read_range(source: BinaryIO, start: int, length: int) -> bytes:
    source.seek(start)
    data = source.read(length)
    if len(data) != length:
        raise ValueError(f"input tar is truncated at {start + len(data)}")
    return data


def iter_range(source: BinaryIO, start: int, length: int, piece: int) -> Iterator[bytes]:
    """``length`` bytes from ``start`` in pieces of at most ``piece`` bytes."""
    done = 0
    while done < length:
        step = min(piece, length - done)
        yield read_range(source, start + done, step)
        done += step


def prioritize(
    members: Sequence[TarMember], prioritized: Sequence[str]
) -> tuple[list[TarMember], list[TarMember]]:
    """Split members into two lists. The first holds the prioritized ones in the given order,
    each preceded by its parent directories and hardlink target; the second holds the rest in
    input order. Names not in the tar are ignored: one prefetch list usually serves every layer
    of an image."""
    by_name: dict[str, int] = {}
    for position, member in enumerate(members):
        by_name.setdefault(_clean(member.path), position)
    chosen: list[int] = []
    taken: set[int] = set()

    def take(name: str) -> None:
        position = by_name.get(name)
        if position is None or position in taken:
            return
        taken.add(position)
        parts = name.split("/")
        for depth in range(1, len(parts)):
            take("/".join(parts[:depth]))
        info = members[position].info
        if info.islnk():
            take(_clean(info.linkname))
        chosen.append(position)

    for name in prioritized:
        take(_clean(name))
    rest = [m for position, m in enumerate(members) if position not in taken]
    return [members[position] for position in chosen], rest


def _clean(name: str) -> str:
    return "/".join(p for p in name.split("/") if p and p != ".")
