"""The one FUSE session of the process: mount and serve (as root with our own protocol
server, otherwise with pyfuse3), or serve an adopted connection with the protocol server;
unmount.

pyfuse3 keeps its session in module globals, so a process has at most one mount; every layer is
a directory of it. ``serve`` returns when the filesystem is unmounted from outside
(``fusermount3 -u``) or when its caller is cancelled; either way the session is closed.

``serve_adopted`` serves a ``/dev/fuse`` fd that an earlier process initialised and the fuse
keeper held across its crash. libfuse cannot serve a connection past INIT, so
``fusefs.fuse.server`` speaks the protocol there. Both paths call the same
``fusefs.handlers``; pyfuse3 stays in this module and ``fusefs.pyfuse3_operations``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from fusefs.fuse.passthrough import DeviceBackingRegistry, HandoverError, Passthrough
from fusefs.fuse.server import DEFAULT_MAX_TASKS, ProtocolServer
from fusefs.handlers import LazyHandlers
from fusefs.pyfuse3_operations import Pyfuse3Operations

log = logging.getLogger(__name__)

_active = False
_device_fd: int | None = None  # pyfuse3's /dev/fuse fd while its session is open
_adopted: ProtocolServer | None = None
# The passthrough state of the last connection this process left mounted, for the next daemon.
_left_passthrough: dict[str, object] | None = None

_FUSE_DEVICE = "/dev/fuse"

# pyfuse3 answers every request in one of ``max_tasks`` tasks, and a READ holds its task until
# it is answered, so READs waiting on a stalled blob could leave none for a lookup. pyfuse3
# starts a task only when no idle one is reading the device, so this is a ceiling, not a pool:
# it is set far above the READs the kernel has outstanding, which the read deadline ends.
PYFUSE3_MAX_TASKS = 4096


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


def _fuse_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _FUSE_DEVICE:
                found.add(int(name))
        except OSError:  # closed meanwhile (the listing's own fd, a worker thread's file)
            continue
    return found


async def serve(
    handlers: LazyHandlers,
    mountpoint: Path,
    *,
    fsname: str = "lazysnap",
    allow_other: bool = True,
    max_tasks: int = PYFUSE3_MAX_TASKS,
    unmount_when_cancelled: Callable[[], bool] = lambda: True,
    libfuse: bool = False,
    passthrough_dir: Path | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount at ``mountpoint`` and serve requests until unmounted or cancelled. When cancelled,
    unmount unless ``unmount_when_cancelled()`` says no. Then only this process's fd is closed,
    and whoever else holds the connection, the fuse keeper, keeps the mount alive.

    As root the mount is made without libfuse and served by our protocol server from INIT on:
    it asks the kernel to cache directory listings and to open files without a round trip,
    which pyfuse3 cannot. Otherwise, or with ``libfuse``, pyfuse3 mounts and serves.
    ``passthrough_dir``: where copies for FUSE passthrough go, if the kernel offers it (our
    protocol server only); None: no passthrough."""
    if _active or _adopted is not None:
        raise RuntimeError("this process already has a FUSE session (pyfuse3 allows one)")
    if not libfuse and os.geteuid() == 0:
        try:
            fd = mount_raw(mountpoint, fsname=fsname, allow_other=allow_other)
        except PermissionError as exc:  # root without CAP_SYS_ADMIN: fusermount3 may still work
            log.warning("fuse mount without libfuse refused, using libfuse error=%r", exc)
        else:
            passthrough = None
            if passthrough_dir is not None:
                passthrough = Passthrough(
                    DeviceBackingRegistry(fd), handlers.whole_file, handlers.file_identity,
                    passthrough_dir,
                )
            await _serve_protocol(
                handlers, fd, mountpoint, answer_lost=False,
                unmount_when_cancelled=unmount_when_cancelled, passthrough=passthrough,
                task_status=task_status,
            )
            return
    await _serve_pyfuse3(
        handlers, mountpoint, fsname=fsname, allow_other=allow_other, max_tasks=max_tasks,
        unmount_when_cancelled=unmount_when_cancelled, task_status=task_status,
    )


async def _serve_pyfuse3(
    handlers: LazyHandlers,
    mountpoint: Path,
    *,
    fsname: str,
    allow_other: bool,
    max_tasks: int,
    unmount_when_cancelled: Callable[[], bool],
    task_status: trio.TaskStatus[None],
) -> None:
    global _active, _device_fd
    before = _fuse_fds()
    operations = Pyfuse3Operations(handlers)
    pyfuse3.init(operations, str(mountpoint), mount_options(fsname, allow_other=allow_other))
    _active = True
    # libfuse does not expose its fd through pyfuse3: the new /dev/fuse link is it.
    new = _fuse_fds() - before
    _device_fd = min(new) if len(new) == 1 else None
    unmounted_outside = False
    log.info("fuse mounted mountpoint=%s fsname=%s device_fd=%s", mountpoint, fsname, _device_fd)
    try:
        task_status.started()
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
        unmounted_outside = True  # main() only returns once the kernel closed the session
    finally:
        _active = False
        _device_fd = None
        # After an external unmount there is nothing left to unmount; otherwise do it now.
        unmount = not unmounted_outside and unmount_when_cancelled()
        pyfuse3.close(unmount=unmount)
        if unmount or unmounted_outside:
            log.info("fuse unmounted mountpoint=%s", mountpoint)
        else:
            log.info("fuse connection left mounted for the next daemon mountpoint=%s", mountpoint)


def lost_requests_answered() -> int:
    """Requests of a dead predecessor that this process answered with EINTR."""
    return 0 if _adopted is None else _adopted.lost_answered


def passthrough() -> Passthrough | None:
    """The FUSE passthrough state of the live session, if the kernel accepted passthrough."""
    return None if _adopted is None else _adopted.passthrough


def dup_device_fd() -> int:
    """A duplicate of the live session's ``/dev/fuse`` fd, which the caller closes. Whoever
    holds one keeps the connection, and so the mount, alive when this process dies."""
    fd = _device_fd if _active else (_adopted.fd if _adopted is not None else None)
    if fd is None:
        raise RuntimeError("no FUSE session with a known /dev/fuse fd")
    return os.dup(fd)


def left_passthrough_state() -> dict[str, object] | None:
    """The passthrough state of the connection this process last left mounted (None: it had
    no passthrough), for the daemon that takes it over (``serve_adopted``)."""
    return _left_passthrough


async def serve_adopted(
    handlers: LazyHandlers,
    fd: int,
    mountpoint: Path,
    *,
    max_tasks: int = DEFAULT_MAX_TASKS,
    unmount_when_cancelled: Callable[[], bool] = lambda: True,
    passthrough_state: object = None,
    passthrough_dir: Path | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the already initialised connection ``fd`` (ours to close) until the filesystem is
    unmounted (returns) or the caller is cancelled (then unmount, as ``serve`` does, unless
    ``unmount_when_cancelled()`` says no).

    ``passthrough_state``: what the predecessor that negotiated passthrough on this connection
    left (``left_passthrough_state``); its backing files and open counts are adopted, and new
    copies go to ``passthrough_dir`` (None: none are made). Without it the connection is
    served without passthrough: a file still open in passthrough mode then cannot be opened
    again until it is closed (docs/fusefs.md, "Restarts")."""
    if _active or _adopted is not None:
        raise RuntimeError("this process already has a FUSE session")
    log.info("fuse connection adopted mountpoint=%s fd=%d", mountpoint, fd)
    passthrough = None
    if passthrough_state is not None:
        passthrough = Passthrough(
            DeviceBackingRegistry(fd), handlers.whole_file, handlers.file_identity,
            passthrough_dir or mountpoint, new_copies=passthrough_dir is not None,
        )
        try:
            passthrough.adopt(passthrough_state)
        except HandoverError as exc:
            log.warning("fuse passthrough state of the previous daemon not adopted error=%s", exc)
            passthrough = None
        else:
            log.info("fuse passthrough adopted backing_files=%d", passthrough.backing_files,
                     extra={"event": "fuse_passthrough_adopted"})
    await _serve_protocol(
        handlers, fd, mountpoint, answer_lost=True, max_tasks=max_tasks,
        unmount_when_cancelled=unmount_when_cancelled, passthrough=passthrough,
        passthrough_negotiated=passthrough is not None, task_status=task_status,
    )


async def _serve_protocol(
    handlers: LazyHandlers,
    fd: int,
    mountpoint: Path,
    *,
    answer_lost: bool,
    unmount_when_cancelled: Callable[[], bool],
    max_tasks: int = DEFAULT_MAX_TASKS,
    passthrough: Passthrough | None = None,
    passthrough_negotiated: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``fd`` served by our protocol server; ``answer_lost`` for a connection taken over."""
    global _adopted, _left_passthrough
    server = ProtocolServer(handlers, fd, max_tasks=max_tasks, answer_lost=answer_lost,
                            passthrough=passthrough,
                            passthrough_negotiated=passthrough_negotiated)
    _adopted = server
    unmounted_outside = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            task_status.started()
            if answer_lost:
                nursery.start_soon(_probe, mountpoint)
        unmounted_outside = True  # serve() only returns once the kernel ended the connection
    finally:
        _adopted = None
        unmount = not unmounted_outside and unmount_when_cancelled()
        if unmount:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(unmount_path, mountpoint)
        os.close(fd)
        if unmount or unmounted_outside:
            log.info("fuse unmounted mountpoint=%s requests=%d", mountpoint, server.requests)
        else:
            # Requests are no longer read, so the opens and backing ids are final: the next
            # daemon goes on from them.
            if server.passthrough is not None:
                _left_passthrough = server.passthrough.handover_state()
                open_files, in_passthrough = server.passthrough.open_counts()
                log.info("fuse passthrough state kept for the next daemon backing_files=%d "
                         "open_files=%d passthrough_open_files=%d",
                         server.passthrough.backing_files, open_files, in_passthrough,
                         extra={"event": "fuse_passthrough_left",
                                "backing_files": server.passthrough.backing_files,
                                "open_files": open_files,
                                "passthrough_open_files": in_passthrough})
            log.info("fuse connection left mounted for the next daemon mountpoint=%s "
                     "requests=%d", mountpoint, server.requests)


_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4


def mount_raw(mountpoint: Path, *, fsname: str = "lazysnap", allow_other: bool = True) -> int:
    """Mount a new FUSE connection at ``mountpoint`` without libfuse (root only) and return its
    fd, for ``serve_adopted``: the protocol server then answers INIT itself. The same options
    as ``mount_options`` (libfuse turns ``ro`` into MS_RDONLY and adds nosuid,nodev)."""
    fd = os.open(_FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
    options += ",default_permissions" + (",allow_other" if allow_other else "")
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.mount(
        fsname.encode(), os.fsencode(mountpoint), b"fuse.lazysnap",
        ctypes.c_ulong(_MS_RDONLY | _MS_NOSUID | _MS_NODEV), options.encode(),
    )
    if result != 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, f"mount {mountpoint}: {os.strerror(error)}")
    log.info("fuse mounted without libfuse mountpoint=%s fd=%d", mountpoint, fd)
    return fd


async def _probe(mountpoint: Path) -> None:
    """Make one request of our own; statfs always reaches the server. The requests lost by the
    previous process are answered when the first request is read, and without this one that
    would wait for the next file access while those callers wait."""
    try:
        await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
    except OSError as exc:
        log.warning("fuse probe failed mountpoint=%s error=%r", mountpoint, exc)


def unmount_path(mountpoint: Path) -> None:
    """Unmount a FUSE mount we did not mount through libfuse (a busy one stays, logged)."""
    for command in (["fusermount3", "-u", str(mountpoint)], ["umount", str(mountpoint)]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("unmount command failed command=%s error=%r", command[0], exc)
            continue
        if done.returncode == 0:
            return
        log.warning("unmount failed command=%s error=%s", command[0], done.stderr.strip())


def forget_root_listing() -> None:
    """Tell the kernel that the mount root's listing changed (a layer attached or detached).
    Only our protocol server lets the kernel cache that listing (zero-message opendirs); a
    pyfuse3 mount answers every opendir of the root without the cache flags."""
    if _adopted is not None:
        _adopted.invalidate_listing(pyfuse3.ROOT_INODE)


def forget_root_entry(name: bytes) -> None:
    """Tell the kernel that ``name`` left the mount root (a detached layer)."""
    if _adopted is not None:
        _adopted.invalidate_entry(pyfuse3.ROOT_INODE, name)
        return
    if not _active:
        return
    try:
        pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, name, ignore_enoent=True)
    except Exception as exc:  # only a cache hint: the lookup fails with ENOENT anyway
        log.warning("entry invalidation failed name=%r error=%r", name, exc)
