"""The read path's tuning, its error, and the chunk decoder it calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fusefs.index import ChunkRef, Codec

Decoder = Callable[[Codec, bytes, ChunkRef], bytes]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Tuning of the read path; the defaults suit a registry 1-50 ms away."""

    # A read miss waits for its whole range, and a program starting up misses file after file
    # at scattered places, so each miss should cost little more than a round trip. Startup
    # benchmark at 100 Mbit/s and 20 ms: imports took 7.7 s with 1 MiB ranges, 6.7 s with
    # 512 KiB and about 5.5 s with 128 KiB. A forward walk grows its ranges by itself
    # (readahead, in ``fusefs.read_policy``).
    ondemand_range: int = 128 * 1024  # largest coalesced request for a read miss
    max_gap: int = 256 * 1024  # unrequested bytes a range may carry to join two chunks
    file_completion_window: int = 64 * MiB  # how much of a file its first read fetches ahead
    file_completion_range: int = 4 * MiB  # nobody waits on these: larger ranges, fewer trips
    file_completion_concurrency: int = 2
    # A program that misses on several files of one directory usually goes on with more of
    # them, as python's __pycache__ or a locale or plugin directory. The
    # ``directory_misses``-th miss there fetches the directory's other files at once, when they
    # come to at most ``directory_fetch_max`` compressed bytes. In the startup benchmark, 21 of
    # the imports workload's 58 misses were in usr/lib/python3.11/__pycache__, 2.4 MB in all.
    directory_misses: int = 3
    directory_fetch_max: int = 4 * MiB
    # A reader whose misses walk forward through the blob, such as ``cat`` of every file or a
    # big file read from the start, gets each next range twice as large, up to this. The range
    # after it is requested before the reader gets there, like the kernel's readahead.
    readahead_max_range: int = 8 * MiB
    # A miss within this many blob bytes of one of the layer's last few misses fetches the small
    # files around the two, at most ``nearby_fetch_max`` compressed bytes. 0: off, the default
    # (the daemon's ``[lazy] nearby_fetch`` sets 512 KiB). Startup benchmark: a gcc compile
    # missed on eight C headers, a round trip apiece, all within 630 KB; but python's imports
    # took twice as long with it (its misses are near each other too, and each nearby fetch put
    # up to 1 MiB on the link ahead of the next one).
    nearby_span: int = 0
    nearby_fetch_max: int = 1 * MiB
    background_range: int = 2 * MiB
    background_concurrency: int = 4
    # Background fetch starts a new range only after no reader has waited on the link for this
    # long. A program starting up reads file after file with short pauses, and every range in
    # flight is link time its next miss queues behind. Startup benchmark: hello took 3.8 s with
    # one background range allowed between misses, 2.7 s with none.
    quiet_period: float = 0.5
    # Nor before the layer's first read miss or this long after attach: a container is usually
    # started right after its image is pulled, and its first reads should find the link empty.
    first_read_grace: float = 2.0
    # Unless readers have been waiting on and off for this long. They are then reading much of
    # the layer, as a build, a scan or read-everything does, and background fetch with several
    # large ranges at a time gets the bytes to them sooner than their own misses one by one.
    long_read: float = 6.0
    # And only once readers have fetched this many bytes of the layer on demand. A container's
    # first seconds can keep the link busy for 6 s with its own misses (the interpreter, its
    # libraries, its imports); background ranges then only queue ahead of them. A scan, a build
    # or read-everything is past 24 MiB soon, and background fetch joins it then. 0: time alone.
    long_read_bytes: int = 24 * MiB
    # For this long after a reader waited on the link, background fetch of all layers together
    # keeps one range of at most ``yield_range`` bytes in flight (0: off). A compiler or a
    # program starting up pauses for longer than ``quiet_period`` between its misses (more so on
    # a loaded machine), and eight 2 MiB background ranges started in such a pause held the link
    # for about 1.3 s at 100 Mbit/s: every miss after it queued behind them (issue 13, gcc).
    # A few small ranges at a time cost a miss at most about their time on the link.
    background_yield: float = 3.0
    yield_range: int = 512 * 1024
    # How many such ranges are on the link at once. With one, the link was idle for a round
    # trip and the decode between two ranges: at 100 Mbit/s and 20 ms, 512 KiB ranges came at
    # 4.7 MB/s, a third of the link, for the whole 3 s after hello's last miss (startup
    # benchmark). With two, the next request crosses the link while the last one's bytes
    # arrive. A range is off the link once its bytes are in, before they are decoded.
    yield_depth: int = 2
    # Background ranges all layers of the daemon hold at once, on the link or being decoded,
    # handed out in attach order (``fusefs.background_budget``). One layer holds at most
    # ``2 * background_concurrency`` on its own, so one image fetches as before; twenty
    # layers attached at once no longer fetch together while their containers start
    # (benchmarks/scale.py: ~12 s more daemon CPU, FUSE reads 5-7x slower).
    background_ranges: int = 8
    # When this many readers wait on the link at once, anywhere on the node, the node is
    # crowded: for ``max(quiet_period, background_yield)`` after, background fetch of all
    # layers together holds one range at a time, whatever each layer's own readers do.
    crowd_readers: int = 4
    hot_bytes: int = 32 * MiB  # decoded chunks kept in memory; a read is often < a chunk
    # Inflated spans of zTOC layers kept in memory: one span (4 MiB by default) holds the chunks
    # of many small files, and each would otherwise inflate it again.
    inflated_span_bytes: int = 16 * MiB
    # A read that has not got its bytes after this long fails with EIO and a log line. The
    # kernel queues a bounded number of READs per mount: one stalled blob must not hold them,
    # nor the mount's worker tasks, for the registry client's minutes of retries.
    read_deadline: float = 20.0
    # Range requests in flight per blob, readers and work ahead of them together. A stalled
    # blob then holds at most this many of the host's connections.
    blob_requests: int = 8
    # Chunks are shared across layers by digest. A reader waiting this long on another
    # layer's fetch of a chunk fetches it from its own blob instead: the other blob may stall.
    foreign_flight_patience: float = 1.0

    # Exec-aware prefetch (``fusefs.exec_prefetch``): a file opened for execution, or an ELF
    # file whose first page is read, is fetched whole with its interpreter and DT_NEEDED
    # libraries, and theirs, down to this depth (0: off), this many files at a time, at most
    # ``exec_prefetch_files`` per program. The loader then finds them instead of missing on
    # each library in turn, a round trip or more apiece.
    exec_prefetch_depth: int = 2
    exec_prefetch_concurrency: int = 4
    exec_prefetch_files: int = 48

    @property
    def exec_prefetch(self) -> bool:
        return self.exec_prefetch_depth > 0 and self.exec_prefetch_concurrency > 0

    def __post_init__(self) -> None:
        if self.read_deadline <= 0 or self.foreign_flight_patience < 0:
            raise ValueError("read_deadline must be positive, foreign_flight_patience >= 0")
        if self.long_read_bytes < 0:
            raise ValueError("long_read_bytes must be >= 0")
        if self.nearby_span < 0 or self.nearby_fetch_max < 0:
            raise ValueError("nearby_span and nearby_fetch_max must be >= 0")
        if self.background_yield < 0 or self.yield_range < 1 or self.yield_depth < 1:
            raise ValueError("background_yield must be >= 0, yield_range and yield_depth positive")
        if min(self.exec_prefetch_depth, self.exec_prefetch_concurrency,
               self.exec_prefetch_files) < 0:
            raise ValueError("exec_prefetch_depth, _concurrency and _files must be >= 0")
        if self.background_ranges < 1 or self.crowd_readers < 1:
            raise ValueError("background_ranges and crowd_readers must be at least 1")
        if self.blob_requests < 1:
            raise ValueError("blob_requests must be at least 1")


class FetchError(Exception):
    """A chunk could not be fetched, decoded or verified; readers get EIO."""


class ReadDeadlineExceeded(FetchError):
    """A read did not get its bytes within ``FetchConfig.read_deadline``; it gets EIO."""
