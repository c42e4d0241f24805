"""``--access-log``: one JSON line per first read of each file, for studying lazy starts.

Each line is ``{"layer": ..., "path": ..., "offset": ..., "size": ..., "seconds": ...}`` where
offset/size are those of the first read request and seconds count from the mount. Lines are
queued on the trio thread and written by one task on a worker thread, so a read never waits on
the log file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO

import trio

log = logging.getLogger(__name__)

_FLUSH_INTERVAL = 0.2


class AccessLog:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._pending: list[str] = []
        self._started = trio.current_time()
        self._wakeup = trio.Event()
        self._file: IO[str] | None = None

    def record(self, layer_id: str, path: str, offset: int, size: int) -> None:
        line = json.dumps(
            {
                "layer": layer_id,
                "path": path,
                "offset": offset,
                "size": size,
                "seconds": round(trio.current_time() - self._started, 6),
            },
            ensure_ascii=False,
        )
        self._pending.append(line + "\n")
        self._wakeup.set()

    async def run(self) -> None:
        """Write queued lines until cancelled; the last lines are written on the way out."""
        self._file = await trio.to_thread.run_sync(self._open)
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self._flush()
                await trio.sleep(_FLUSH_INTERVAL)
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()
                await trio.to_thread.run_sync(self._file.close)

    def _open(self) -> IO[str]:
        return open(self._path, "a", encoding="utf-8")

    async def _flush(self) -> None:
        if not self._pending or self._file is None:
            return
        lines, self._pending = self._pending, []
        file = self._file
        await trio.to_thread.run_sync(lambda: (file.writelines(lines), file.flush()))
