"""A FUSE server over the fake layers of ``tests.integration.fuse_support`` that survives its
own SIGKILL the way the daemon does: it hands its connection to a fuse keeper, and a new
instance takes it over from the keeper and serves it with the protocol server.

    python -m tests.support.fuse_resume_server MOUNTPOINT CACHE_DIR KEEPER_SOCKET [--no-keeper]
        [--stall-top] [--raw] [--passthrough] [--leave-on-term]

``--stall-top``: reads from layer "top" never complete (a request read and never answered).
``--raw``: mount without libfuse and serve with the protocol server from INIT on (with
``--no-keeper``: no takeover involved).
``--passthrough``: ask for FUSE passthrough (``[fuse] passthrough = "auto"``); layer "base" then
also holds ``huge``, a file big enough for a backing copy, and INFO lines are logged.
``--leave-on-term``: SIGTERM leaves the connection mounted for the next server and the
passthrough state with the keeper, as the daemon does with ``lazy.keep_mounted_on_stop``.

Layers "base" (slot 1) and "top" (slot 2) are attached at fixed slots, as the daemon does from
its database. Once serving, ``<MOUNTPOINT>.ready`` holds ``<pid> mounted|adopted``. SIGTERM
unmounts and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import trio

from fusefs import LazyFilesystem, session
from snapshotter.daemon import keeper as fuse_keeper
from tests.integration.fuse_support import (
    BASE_ENTRIES,
    PASSTHROUGH_BIG,
    TOP_ENTRIES,
    FakeBlob,
    FakeEntry,
    FakeIndex,
    fake_decoder,
)


async def _main(
    mountpoint: Path, cache_dir: Path, keeper_socket: Path, use_keeper: bool, stall_top: bool,
    raw: bool, passthrough: bool, leave_on_term: bool,
) -> None:
    handover = fuse_keeper.take_over(keeper_socket, mountpoint) if use_keeper else None
    adopt_fd = None if handover is None else handover.fd
    if raw:
        adopt_fd = session.mount_raw(mountpoint)  # the protocol server from INIT on
    note = handover.note if handover is not None and isinstance(handover.note, dict) else {}
    fs = LazyFilesystem(mountpoint, cache_dir, decoder=fake_decoder, adopt_fd=adopt_fd,
                        passthrough=passthrough, passthrough_handover=note.get("passthrough"))
    async with trio.open_nursery() as nursery:

        async def serve(*, task_status: trio.TaskStatus[None]) -> None:
            await fs.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    if leave_on_term:
                        fs.leave_mounted()
                    else:
                        fs.unmount()
                    return

        nursery.start_soon(stop_on_signal)
        await nursery.start(serve)
        if adopt_fd is None and use_keeper:
            fd = fs.dup_device_fd()
            try:
                fuse_keeper.start_keeper(keeper_socket, fd, mountpoint)
            finally:
                os.close(fd)
        entries = BASE_ENTRIES
        if passthrough:
            entries = [*entries, FakeEntry("huge", content=PASSTHROUGH_BIG)]
        base = FakeIndex(entries, chunk_size=64 * 1024, corrupt_digest_of="bad")
        await fs.attach("base", FakeBlob(base.blob_bytes), base, background_fetch=False, slot=1)
        top = FakeIndex(TOP_ENTRIES)
        top_blob = FakeBlob(top.blob_bytes)
        if stall_top:
            top_blob.gate = trio.Event()  # never set: reads of "top" hang, unanswered
        await fs.attach("top", top_blob, top, background_fetch=False, slot=2)
        fs.resume()
        how = "raw" if raw else "mounted" if handover is None else "adopted"
        ready = mountpoint.with_name(mountpoint.name + ".ready")
        # Written aside and renamed: the test polls for the file and reads it at once.
        written = ready.with_name(ready.name + ".tmp")
        written.write_text(f"{os.getpid()} {how}\n")
        written.rename(ready)
    state = fs.passthrough_handover()
    if leave_on_term and state is not None:
        fuse_keeper.leave_note(keeper_socket, {"passthrough": state})


def _flag(name: str) -> bool:
    return name in sys.argv[4:]


if __name__ == "__main__":
    if _flag("--passthrough"):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    trio.run(
        _main, Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), not _flag("--no-keeper"),
        _flag("--stall-top"), _flag("--raw"), _flag("--passthrough"), _flag("--leave-on-term"),
    )
