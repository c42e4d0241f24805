"""zTOC spans fetched and inflated once for all their files: span mates and span flights.

A zTOC chunk is a file's share of one span, so every file of a span needs the same compressed
bytes and the same inflation. A range that inflates a span therefore also decodes the span's
other missing chunks, its *mates*: they cost a slice of bytes inflated anyway, and a later read
of a neighbour then finds its chunk cached instead of fetching and inflating the span again.

Readers of two files of one span can still miss at the same moment, each claiming its own
chunk. A range waits for another range that is fetching one of its spans (``SpanFlights``), and
then decodes from the inflated span that range left, without a request when every span it
needs is there: one fetch and one inflation per span.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from fusefs.index import ChunkRef
from fusefs.inflated_spans import span_layer
from fusefs.layer import ChunkTag, Layer


class SpanFlights:
    """Which spans a range is fetching and inflating now (trio thread), and their mates."""

    def __init__(self) -> None:
        self._busy: dict[tuple[str, int], trio.Event] = {}

    def mates(self, layer: Layer, refs: Iterable[ChunkRef]) -> list[tuple[ChunkTag, ChunkRef]]:
        """Every chunk sharing a span with one of ``refs``; none for other formats."""
        if span_layer(layer.index) is None:
            return []
        offsets = {ref.blob_offset for ref in refs}
        return [mate for offset in offsets for mate in layer.chunks_starting_at(offset)]

    async def wait_for_others(self, layer: Layer, offsets: set[int]) -> None:
        """Wait until no other range fetches a span at one of ``offsets``."""
        while True:
            busy = next(
                (e for o in offsets if (e := self._busy.get((layer.digest, o))) is not None),
                None,
            )
            if busy is None:
                return
            await busy.wait()

    def start(self, layer: Layer, offsets: set[int]) -> list[tuple[str, int]]:
        """Mark the spans at ``offsets`` as fetched by the caller, who must ``end`` them."""
        keys = [(layer.digest, offset) for offset in offsets]
        for key in keys:
            self._busy[key] = trio.Event()
        return keys

    def end(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            event = self._busy.pop(key, None)
            if event is not None:
                event.set()
