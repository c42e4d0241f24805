"""Chunks of plain gzip layers served through a SOCI zTOC: inflate a span once for all its chunks.

A zTOC chunk is a file's share of one span, and a span holds many small files: inflating the
whole span for each of them would cost a few MiB of inflate per chunk. So inflated spans are kept
in a small LRU shared by every layer, bounded in bytes. Only verified spans enter it:
``ZtocLayer.inflate`` checks the span's length and, when the zTOC has them, its digest.

A span may begin in the middle of a byte. Its compressed bytes then start one byte before the
blob offset its chunks name, so a range holding zTOC chunks is requested with that byte in
front (``lead_bytes``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from fusefs.fetch_config import FetchError
from fusefs.formats.ztoc import ZtocLayer
from fusefs.index import ChunkRef, LayerIndex


def span_layer(index: LayerIndex) -> ZtocLayer | None:
    """The zTOC behind ``index`` when its chunks are spans of a plain gzip blob."""
    return index if isinstance(index, ZtocLayer) else None


def lead_bytes(index: LayerIndex, start: int) -> int:
    """Bytes to request before a range starting at ``start``: a span's partial first byte."""
    return 1 if start > 0 and isinstance(index, ZtocLayer) else 0


class InflatedSpans:
    """Verified inflated spans by (blob digest, span number); safe to use from worker threads."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._bytes = 0
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.inflations = 0  # spans inflated so far, for tests and the curious

    def chunk(
        self,
        ztoc: ZtocLayer,
        blob: str,
        ref: ChunkRef,
        raw: bytes,
        start: int,
        failed: dict[int, Exception],
    ) -> bytes:
        """The bytes of chunk ``ref``; ``raw`` is the blob from ``start`` on, and holds the
        chunk's span unless the span is already here. ``failed`` remembers the spans of one
        range that failed, so their other chunks fail without inflating them again."""
        span = ztoc.span_of(ref)
        if span in failed:
            raise failed[span]
        data = self._get((blob, span))
        if data is None:
            begin, end = ztoc.spans.compressed_range(span)
            if begin < start or end > start + len(raw):
                raise FetchError(f"range [{start}, {start + len(raw)}) lacks span {span}")
            try:
                data = ztoc.inflate(span, raw[begin - start : end - start])
            except Exception as exc:
                failed[span] = exc
                raise
            with self._lock:
                self.inflations += 1
            self._put((blob, span), data)
        stop = ref.inner_offset + ref.size
        if stop > len(data):
            raise FetchError(f"chunk needs {stop} bytes of span {span}, which has {len(data)}")
        return data[ref.inner_offset : stop]

    def holds(self, blob: str, spans: set[int]) -> bool:
        """Whether every one of ``spans`` is here (it may be evicted right after)."""
        with self._lock:
            return all((blob, span) in self._items for span in spans)

    def _get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def _put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            if len(data) > self._budget or key in self._items:
                return
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self._budget:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
