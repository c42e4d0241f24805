"""One stalled blob must not freeze the mount (issue 15, items 1 and 2), through real FUSE.

Readers pile up on a layer whose blob never answers. Meanwhile lookups, getattr and readdir of
another layer on the same mount must be answered at once, its reads must succeed within about
one read deadline, and every read of the stalled layer must fail with EIO instead of hanging.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.fuse_support import REPO, python_args, running_mount, wait_for
from tests.integration.stall_support import HEALTHY_FILES, STALLED_FILES, healthy_content

pytestmark = [pytest.mark.root, pytest.mark.fuse]

READ_DEADLINE = 1.0


class Timed:
    """Runs ``action`` on a thread of its own: a FUSE request stuck in the kernel cannot be
    cancelled, so the test waits for it with a timeout instead."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.result: object = None
        self.error: OSError | None = None
        self.seconds: float | None = None
        self._action = action
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._action()
        except OSError as exc:
            self.error = exc
        self.seconds = time.monotonic() - self._started

    def join(self, until: float) -> bool:
        self._thread.join(max(0.0, until - time.monotonic()))
        return self.seconds is not None


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_stalled_layer_costs_other_layers_nothing_and_its_readers_a_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # so ``python -m tests.integration.stall_support`` resolves
    mnt = tmp_path / "mnt"
    args = python_args(
        "-m", "tests.integration.stall_support", str(mnt), str(tmp_path / "cache"),
        str(READ_DEADLINE),
    )
    with running_mount(args, mnt) as server:
        wait_for((tmp_path / "attached").exists, 30, "layers attached")
        stalled = [Timed(lambda i=i: read_file(mnt / "stalled" / f"s{i}"))
                   for i in range(STALLED_FILES)]
        time.sleep(0.5)  # the stalled reads reach the daemon and wait on their blob
        healthy = mnt / "healthy" / "dir"
        metadata = [Timed(lambda: sorted(os.listdir(healthy)))]
        metadata += [Timed(lambda i=i: os.stat(healthy / f"h{i}").st_size)
                     for i in range(HEALTHY_FILES)]
        give_up = time.monotonic() + 10 * READ_DEADLINE
        assert all(t.join(give_up) for t in metadata), "metadata waited behind stalled reads"
        metadata_max = max(t.seconds or 0.0 for t in metadata)
        reads = [Timed(lambda i=i: read_file(healthy / f"h{i}")) for i in range(HEALTHY_FILES)]
        done = [t.join(give_up) for t in reads]
        read_max = max(t.seconds or 0.0 for t in reads if t.seconds is not None) if any(done) else 0
        stalled_give_up = time.monotonic() + 20
        stalled_done = [t.join(stalled_give_up) for t in stalled]
        print(f"metadata max {metadata_max:.2f} s; healthy reads {sum(done)}/{len(reads)} "
              f"max {read_max:.2f} s; stalled reads ended {sum(stalled_done)}/{len(stalled)}")
        # Answered at once, not when a stalled READ's deadline frees a task.
        assert metadata_max < READ_DEADLINE / 4, f"metadata took {metadata_max:.2f} s"
        assert [t.result for t in reads] == [healthy_content(i) for i in range(HEALTHY_FILES)]
        # A healthy read may queue in the kernel behind stalled READs, but for one deadline.
        assert read_max < 3 * READ_DEADLINE + 1, f"a healthy read took {read_max:.2f} s"
        assert all(stalled_done), "reads of the stalled layer still hang"
        assert {t.error.errno for t in stalled if t.error} == {errno.EIO}
        assert all(t.result is None for t in stalled), "a stalled read returned bytes"
        assert "read deadline" in server.output()
