"""``lazysnap convert --optimize CMD``: run a converted image once, lazily mounted, and record the
order in which the command first read files; those files then go first in the final layers.

The image is mounted by ``lazysnap mount IMAGE --access-log`` in a child process, because
pyfuse3 allows one FUSE session per process. A writable overlay goes on top, since runc needs to
create mount points. The command runs in it with runc: its own namespaces, no network but loopback,
the image's environment and working directory, a time limit. Blocking: call it in a thread.
Needs root, /dev/fuse and runc.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.convert.documents import ConvertError

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 60.0  # seconds for `lazysnap mount` to resolve the image and attach its layers
STOP_TIMEOUT = 20.0
DEFAULT_RUN_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class OptimizeSpec:
    command: tuple[str, ...]  # argv, run in the image; argv[0] is looked up on the image's PATH
    timeout: float = DEFAULT_RUN_TIMEOUT  # the command is killed after this many seconds
    hosts_dir: str | None = None  # for the mount's registry client


@dataclass(frozen=True, slots=True)
class OptimizeRun:
    exit_code: int | None  # None: killed at the time limit
    seconds: float
    paths: tuple[str, ...]  # image paths, in the order of their first read


def check_requirements() -> None:
    """Fail before any conversion when the command cannot be run here."""
    missing = [tool for tool in ("runc", "fusermount3") if shutil.which(tool) is None]
    if missing:
        raise ConvertError(f"--optimize needs {' and '.join(missing)} on PATH")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise ConvertError("--optimize needs root and /dev/fuse (it mounts the image over FUSE)")


def read_order(access_log: str) -> tuple[str, ...]:
    """Image paths from an access log (JSON lines), by time of first read, each once."""
    reads: list[tuple[float, int, str]] = []
    for number, line in enumerate(access_log.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            reads.append((float(record["seconds"]), number, str(record["path"]).lstrip("/")))
        except (ValueError, KeyError, TypeError):
            log.warning("optimize skip-access-log-line line=%d", number + 1)
    reads.sort()
    return tuple(dict.fromkeys(path for _seconds, _number, path in reads if path))


def runc_spec(
    rootfs: Path, argv: Sequence[str], env: Sequence[str], cwd: str
) -> dict[str, Any]:
    """A minimal OCI runtime spec: root in the container, fresh namespaces, the usual mounts."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(argv),
            "env": list(env),
            "cwd": cwd or "/",
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": "lazysnap-optimize",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [
                {"type": kind} for kind in ("pid", "network", "ipc", "uts", "mount")
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def record_reads(image: str, spec: OptimizeSpec, env: Sequence[str], cwd: str) -> OptimizeRun:
    """Mount ``image`` lazily, run the command in it, and return what it read, as the module
    docstring describes."""
    work = Path(tempfile.mkdtemp(prefix="lazysnap-optimize-"))
    access_log = work / "access.jsonl"
    try:
        with _lazy_mount(image, work / "image", access_log, spec.hosts_dir) as lower, \
                _writable_overlay(lower, work) as rootfs:
            exit_code, seconds = _run_in(rootfs, work / "bundle", spec, env, cwd)
        # The mount process has flushed and closed the log by now.
        text = access_log.read_text(errors="replace") if access_log.exists() else ""
        return OptimizeRun(exit_code, seconds, read_order(text))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _lazy_mount(
    image: str, mountpoint: Path, access_log: Path, hosts_dir: str | None
) -> Iterator[Path]:
    mountpoint.mkdir()
    command = [
        sys.executable, "-m", "snapshotter.cli", "mount", image, str(mountpoint),
        "--access-log", str(access_log), "--no-background-fetch",
        *(["--hosts-dir", hosts_dir] if hosts_dir else []),
    ]
    errors = mountpoint.parent / "mount.err"
    with errors.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                detail = errors.read_text(errors="replace").strip().splitlines()
                raise ConvertError(
                    f"--optimize: mounting {image} failed: "
                    f"{detail[-1] if detail else 'timed out'}"
                )
            time.sleep(0.1)
        yield mountpoint
    finally:
        _stop(process)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _writable_overlay(lower: Path, work: Path) -> Iterator[Path]:
    rootfs, upper, scratch = work / "rootfs", work / "upper", work / "work"
    for directory in (rootfs, upper, scratch):
        directory.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(rootfs)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield rootfs
    finally:
        subprocess.run(["umount", "-l", str(rootfs)], check=False, capture_output=True)


def _run_in(
    rootfs: Path, bundle: Path, spec: OptimizeSpec, env: Sequence[str], cwd: str
) -> tuple[int | None, float]:
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(runc_spec(rootfs, spec.command, env, cwd)))
    state = bundle / "runc"
    name = f"lazysnap-optimize-{os.getpid()}"
    runc = ["runc", "--root", str(state)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*runc, "run", "--bundle", str(bundle), name],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=spec.timeout, check=False,
        )
        exit_code: int | None = done.returncode
        if done.returncode != 0:
            log.warning("optimize command-failed exit=%d stderr=%r", done.returncode,
                        done.stderr[-500:])
    except subprocess.TimeoutExpired:
        exit_code = None  # the reads so far still count
    finally:
        subprocess.run([*runc, "kill", name, "KILL"], check=False, capture_output=True)
        subprocess.run([*runc, "delete", "-f", name], check=False, capture_output=True)
    return exit_code, time.monotonic() - started
