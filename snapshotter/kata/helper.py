"""``nydus-overlayfs-lazysnap``: mount a Kata guest-pull rootfs on the host as a plain overlay.

containerd mounts a ``fuse.<helper>`` mount by running ``mount.fuse <source> <target> -o <options>
-t <helper>``; mount.fuse (fuse3's) joins the options with commas, adds ``dev,suid`` and runs
``<helper> <source> <target> -o <options>``. This helper refuses anything lazysnap would not have
written, drops the Kata volume (the kernel does not know it) and hands the overlay to mount(8).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from snapshotter.store.guest_pull import (
    MOUNT_SOURCE,
    VOLUME_OPTION,
    VOLUME_TYPE,
    VolumeError,
    parse_volume,
)
from snapshotter.store.mounts import MOUNT_OPTIONS_BUDGET

PROGRAM = "nydus-overlayfs-lazysnap"
USAGE = f"usage: {PROGRAM} overlay <target> -o <options>"
DIRECTORY_KEYS = ("lowerdir", "upperdir", "workdir")


class OptionsError(ValueError):
    """The arguments are not what lazysnap writes; the message says which and why."""


@dataclass(frozen=True, slots=True)
class OverlayMount:
    target: str
    lowers: tuple[str, ...]
    upper: str | None
    work: str | None
    other: tuple[str, ...]  # flags and overlay options passed through, in order

    def data(self, lowers: Sequence[str]) -> str:
        options = [*self.other, "lowerdir=" + ":".join(lowers)]
        if self.upper is not None and self.work is not None:
            options += [f"upperdir={self.upper}", f"workdir={self.work}"]
        return ",".join(options)


def _split_arguments(argv: Sequence[str]) -> tuple[str, str, list[str]]:
    positional: list[str] = []
    options: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "-o":
            value = next(items, None)
            if value is None:
                raise OptionsError("-o needs a value")
            options += value.split(",")
        elif item.startswith("-"):
            raise OptionsError(f"unknown flag {item!r}")
        else:
            positional.append(item)
    if len(positional) != 2:
        raise OptionsError(f"expected a source and a target, got {len(positional)} arguments")
    return positional[0], positional[1], options


def _directories(key: str, value: str) -> list[str]:
    paths = value.split(":") if key == "lowerdir" else [value]
    for path in paths:
        if not path or not path.startswith("/"):
            raise OptionsError(f"{key}: {path!r} is not an absolute path")
    return paths


def parse_arguments(argv: Sequence[str]) -> OverlayMount:
    """Check every argument; the Kata volume must be one Kata itself would accept."""
    source, target, options = _split_arguments(argv)
    if source != MOUNT_SOURCE:
        raise OptionsError(f"source must be {MOUNT_SOURCE!r}, got {source!r}")
    directories: dict[str, list[str]] = {}
    volumes: list[str] = []
    other: list[str] = []
    for option in options:
        if not option:
            raise OptionsError("an empty option (two commas in a row)")
        if option.startswith(VOLUME_OPTION):
            volumes.append(option[len(VOLUME_OPTION):])
            continue
        key, _, value = option.partition("=")
        if key in DIRECTORY_KEYS:
            if key in directories:
                raise OptionsError(f"{key} is given twice")
            directories[key] = _directories(key, value)
        else:
            other.append(option)
    if len(volumes) != 1:
        raise OptionsError(f"expected one {VOLUME_OPTION}… option, got {len(volumes)}")
    try:
        volume = parse_volume(volumes[0])
    except VolumeError as exc:
        raise OptionsError(f"{VOLUME_OPTION}…: {exc}") from None
    if volume["volume_type"] != VOLUME_TYPE:
        raise OptionsError(f"the volume is of type {volume['volume_type']!r}, not {VOLUME_TYPE!r}")
    if "lowerdir" not in directories:
        raise OptionsError("no lowerdir")
    if ("upperdir" in directories) != ("workdir" in directories):
        raise OptionsError("upperdir and workdir go together")
    upper = directories.get("upperdir", [None])[0]
    work = directories.get("workdir", [None])[0]
    lowers = directories["lowerdir"]
    if "ro" in other and upper is not None:
        # As containerd does for a read-only overlay (its temporary mounts for reading
        # /etc/passwd): the upper directory becomes the top lower one, and no work directory
        # is touched.
        lowers, upper, work = [upper, *lowers], None, None
    if upper is None and len(lowers) < 2:
        raise OptionsError("a mount without upperdir needs at least two lower directories")
    return OverlayMount(target, tuple(lowers), upper, work, tuple(other))


def compacted(mount: OverlayMount) -> tuple[str, str | None]:
    """The mount data, and the directory to mount from when the lower directories had to be
    named relative to their common directory to fit a page (as containerd does for overlay)."""
    data = mount.data(mount.lowers)
    if len(data) <= MOUNT_OPTIONS_BUDGET:
        return data, None
    common = os.path.commonpath(mount.lowers)
    relative = [os.path.relpath(lower, common) for lower in mount.lowers]
    return mount.data(relative), common


def main(argv: Sequence[str] | None = None) -> int:
    try:
        mount = parse_arguments(sys.argv[1:] if argv is None else argv)
    except OptionsError as exc:
        print(f"{PROGRAM}: refusing the mount: {exc}\n{USAGE}", file=sys.stderr)
        return 1
    data, cwd = compacted(mount)
    result = subprocess.run(
        ["mount", "-t", "overlay", MOUNT_SOURCE, mount.target, "-o", data], cwd=cwd, check=False
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
