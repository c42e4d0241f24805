"""A FUSE server with a stalled layer and a healthy one, run as
``python -m tests.integration.stall_support MOUNTPOINT CACHE_DIR READ_DEADLINE``.

Layer "stalled" has ``STALLED_FILES`` files whose blob never answers a range; layer "healthy"
has ``HEALTHY_FILES`` whose blob answers at once. Both are on one mount, as every layer of a
node is.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fusefs.index import EntryKind
from tests.integration.fuse_support import FakeBlob, FakeEntry, FakeIndex, fake_decoder

STALLED_FILES = 100
HEALTHY_FILES = 10


def stalled_entries() -> list[FakeEntry]:
    return [FakeEntry(f"s{i}", content=bytes([i]) * 9000) for i in range(STALLED_FILES)]


def healthy_content(i: int) -> bytes:
    return f"healthy {i}\n".encode() * 700


def healthy_entries() -> list[FakeEntry]:
    return [FakeEntry("dir", kind=EntryKind.DIR, perm=0o755)] + [
        FakeEntry(f"dir/h{i}", content=healthy_content(i)) for i in range(HEALTHY_FILES)
    ]


def _serve(mountpoint: Path, cache_dir: Path, read_deadline: float) -> None:
    import dataclasses  # noqa: PLC0415

    import trio  # noqa: PLC0415

    from fusefs import FetchConfig, LazyFilesystem  # noqa: PLC0415

    # Knobs this tree does not have are left out, so the same script measures older trees.
    known = {field.name for field in dataclasses.fields(FetchConfig)}
    wanted = {"read_deadline": read_deadline, "first_read_grace": 3600.0}
    config = FetchConfig(**{k: v for k, v in wanted.items() if k in known})  # type: ignore[arg-type]

    async def main() -> None:
        fs = LazyFilesystem(mountpoint, cache_dir, decoder=fake_decoder, config=config)
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[None]) -> None:
                await fs.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        fs.unmount()
                        return

            nursery.start_soon(stop_on_signal)
            await nursery.start(serve)
            stalled_index = FakeIndex(stalled_entries(), chunk_size=4096)
            stalled = FakeBlob(stalled_index.blob_bytes, digest="sha256:" + "5" * 64)
            stalled.gate = trio.Event()  # never set: the blob never answers
            healthy_index = FakeIndex(healthy_entries(), chunk_size=4096)
            healthy = FakeBlob(healthy_index.blob_bytes)
            await fs.attach("stalled", stalled, stalled_index, background_fetch=False)
            await fs.attach("healthy", healthy, healthy_index, background_fetch=False)
            (mountpoint.parent / "attached").write_text("yes")

    trio.run(main)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _serve(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
