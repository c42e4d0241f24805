"""The forward-only reader tarfile's random-access mode reads the layer's tar through."""

from __future__ import annotations

import io

import pytest

from snapshotter.client.tar_stream import READ_SIZE, BackwardSeekError, ForwardReader


class Chunked:
    """A stream that gives at most ``piece`` bytes a read, and counts the reads."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data = io.BytesIO(data)
        self._piece = piece
        self.reads = 0

    def read(self, size: int = -1, /) -> bytes:
        self.reads += 1
        return self._data.read(self._piece if size < 0 else min(size, self._piece))


DATA = bytes(range(256)) * 4000  # 1,024,000 bytes


@pytest.mark.parametrize("piece", [1, 7, 512, READ_SIZE])
def test_reads_across_the_streams_pieces_and_seeks_forward(piece: int) -> None:
    reader = ForwardReader(Chunked(DATA, piece))
    assert reader.read(0) == b""
    assert reader.read(10) == DATA[:10]
    assert reader.tell() == 10
    assert reader.seek(5000) == 5000
    assert reader.read(300_000) == DATA[5000:305_000]
    reader.seek(305_000)  # where it is: nothing to skip
    assert reader.read(3) == DATA[305_000:305_003]
    assert reader.read() == DATA[305_003:]
    assert reader.read(5) == b""
    assert reader.tell() == len(DATA)


def test_a_read_past_the_end_is_short_and_a_seek_past_it_stops_there() -> None:
    reader = ForwardReader(Chunked(DATA, 4096))
    reader.seek(len(DATA) - 4)
    assert reader.read(10) == DATA[-4:]
    assert reader.seek(len(DATA) + 100) == len(DATA)


def test_it_never_seeks_backwards() -> None:
    reader = ForwardReader(Chunked(DATA, 4096))
    reader.read(100)
    with pytest.raises(BackwardSeekError):
        reader.seek(99)
    with pytest.raises(BackwardSeekError):
        reader.seek(0, io.SEEK_END)


def test_the_stream_is_read_in_large_pieces() -> None:
    stream = Chunked(DATA, 10 * 1024 * 1024)
    reader = ForwardReader(stream)
    for _ in range(2000):  # tarfile's pattern: a 512-byte header, then a small file
        reader.read(512)
    assert stream.reads == -(-2000 * 512 // READ_SIZE)
