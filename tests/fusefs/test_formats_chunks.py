"""decode_chunk and verify_chunk: gzip members with inner offsets, zstd frames, zeros, damage."""

from __future__ import annotations

import io
import os
import tarfile
import zlib

import pytest
import trio
import zstandard

from fusefs.formats import (
    ChunkDecodeError,
    ChunkDigestError,
    LayerFormatError,
    decode_chunk,
    load_layer_index,
    verify_chunk,
    write_estargz,
    write_zstd_chunked,
)
from fusefs.index import ChunkRef, Codec, EntryKind, LayerIndex
from tests.fusefs.formats_support import MemoryBlob, gzip_member, sha, walk


def ref(data: bytes, compressed_len: int, *, inner: int = 0, zeros: bool = False) -> ChunkRef:
    return ChunkRef(
        file_offset=0,
        size=len(data),
        blob_offset=0,
        blob_end=compressed_len,
        inner_offset=inner,
        digest=sha(data),
        zeros=zeros,
    )


def test_gzip_chunk_with_inner_offset_and_trailing_headers() -> None:
    data = os.urandom(5000)
    member = gzip_member(b"H" * 512 + data + b"\0" * 1000)
    assert decode_chunk(Codec.GZIP, member, ref(data, len(member), inner=512)) == data
    assert decode_chunk(Codec.GZIP, memoryview(member), ref(data, len(member), inner=512)) == data


def test_gzip_chunk_spanning_members() -> None:
    data = os.urandom(3000)
    blob = gzip_member(data[:1000]) + gzip_member(data[1000:])
    assert decode_chunk(Codec.GZIP, blob, ref(data, len(blob))) == data


def test_zstd_chunk_across_frames() -> None:
    data = os.urandom(3000)
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(data[:100]) + cctx.compress(data[100:])
    assert decode_chunk(Codec.ZSTD, blob, ref(data, len(blob))) == data
    streamed = cctx.compressobj()
    unsized = streamed.compress(data) + streamed.flush()  # no content size in the frame
    assert decode_chunk(Codec.ZSTD, unsized, ref(data, len(unsized))) == data


def test_zeros_chunk_needs_no_bytes() -> None:
    data = bytes(4096)
    assert decode_chunk(Codec.ZSTD, b"", ref(data, 0, zeros=True)) == data


@pytest.mark.parametrize("codec", [Codec.GZIP, Codec.ZSTD])
def test_truncated_or_garbage_chunks_fail_to_decode(codec: Codec) -> None:
    data = os.urandom(4000)
    if codec is Codec.GZIP:
        compressed = gzip_member(data)
    else:
        compressed = zstandard.ZstdCompressor().compress(data)
    with pytest.raises(ChunkDecodeError):
        decode_chunk(codec, compressed[: len(compressed) // 2], ref(data, len(compressed)))
    with pytest.raises(ChunkDecodeError):
        decode_chunk(codec, b"garbage" * 10, ref(data, 70))


def test_verify_chunk() -> None:
    data = b"content"
    verify_chunk(ref(data, 0), data)
    with pytest.raises(ChunkDigestError, match="digest"):
        verify_chunk(ref(data, 0), b"CONTENT")
    with pytest.raises(ChunkDigestError, match="bytes"):
        verify_chunk(ref(data, 0), b"short")
    assert issubclass(ChunkDigestError, LayerFormatError)


def _layer(codec: Codec) -> tuple[bytes, LayerIndex]:
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as archive:
        for i in range(3):
            content = os.urandom(50_000)
            info = tarfile.TarInfo(f"f{i}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    plain.seek(0)
    if codec is Codec.GZIP:
        write_estargz(plain, out, chunk_size=16_384)
    else:
        write_zstd_chunked(plain, out, chunk_size=16_384)
    blob = out.getvalue()

    async def main() -> LayerIndex:
        return await load_layer_index(MemoryBlob(blob))

    return blob, trio.run(main)


@pytest.mark.parametrize("codec", [Codec.GZIP, Codec.ZSTD])
def test_corrupted_chunk_is_never_returned_as_good(codec: Codec) -> None:
    blob, index = _layer(codec)
    detected = 0
    for _, entry in walk(index):
        if index.attr(entry).kind != EntryKind.REG:
            continue
        for chunk in index.chunks(entry):
            compressed = blob[chunk.blob_offset : chunk.blob_end]
            good = decode_chunk(codec, compressed, chunk)
            verify_chunk(chunk, good)
            for position in range(0, len(compressed), 97):
                damaged = bytearray(compressed)
                damaged[position] ^= 0x55
                try:
                    data = decode_chunk(codec, bytes(damaged), chunk)
                    verify_chunk(chunk, data)
                except LayerFormatError:
                    detected += 1
                    continue
                # Damage past the chunk's bytes (e.g. the next tar header in the same gzip
                # member) is harmless; anything else must have been detected.
                assert data == good
    assert detected > 0


def test_zlib_is_what_gzip_chunks_use() -> None:
    # The writer's members are plain gzip members: any gzip reader handles a single chunk.
    data = b"abc" * 1000
    member = gzip_member(data)
    assert zlib.decompress(member, wbits=31) == data
