"""The one pyfuse3 session of the process: mount, serve in trio, unmount.

pyfuse3 keeps its session in module globals, so a process has at most one mount; every layer is
a directory of it. ``serve`` returns when the filesystem is unmounted from outside
(``fusermount3 -u``) or when its caller is cancelled; either way the session is closed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyfuse3
import trio

log = logging.getLogger(__name__)

_active = False


def mount_options(fsname: str, *, allow_other: bool = True) -> set[str]:
    # No max_read: libfuse then negotiates its largest request size (max_pages, 1 MiB with
    # libfuse 3.14), and pyfuse3 cannot set the matching conn->max_read that the option needs.
    options = {
        f"fsname={fsname}",
        "subtype=lazysnap",
        "ro",
        "default_permissions",  # the kernel checks mode bits; we never see access()
    }
    if allow_other:
        options.add("allow_other")  # containers run as other users
    return options


async def serve(
    operations: pyfuse3.Operations,
    mountpoint: Path,
    *,
    fsname: str = "lazysnap",
    allow_other: bool = True,
    max_tasks: int = 64,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount at ``mountpoint`` and serve requests until unmounted or cancelled."""
    global _active
    if _active:
        raise RuntimeError("this process already has a FUSE session (pyfuse3 allows one)")
    pyfuse3.init(operations, str(mountpoint), mount_options(fsname, allow_other=allow_other))
    _active = True
    unmounted_outside = False
    log.info("fuse mounted mountpoint=%s fsname=%s", mountpoint, fsname)
    try:
        task_status.started()
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        unmounted_outside = True  # main() only returns once the kernel closed the session
    finally:
        _active = False
        # After an external unmount there is nothing left to unmount; otherwise do it now.
        pyfuse3.close(unmount=not unmounted_outside)
        log.info("fuse unmounted mountpoint=%s", mountpoint)


def forget_root_entry(name: bytes) -> None:
    """Tell the kernel that ``name`` left the mount root (a detached layer)."""
    if not _active:
        return
    try:
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)
    except Exception as exc:  # only a cache hint: the lookup fails with ENOENT anyway
        log.warning("entry invalidation failed name=%r error=%r", name, exc)
