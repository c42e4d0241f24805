"""Disk usage of a directory tree, counted like du: allocated blocks, each inode once.

The tree may change during the walk, as in Usage of a running container's snapshot. Entries that
vanish are skipped, like ``du`` does, instead of failing the call.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.model import Usage


def disk_usage(top: Path) -> Usage:
    """Usage of ``top`` and everything under it. As in containerd's fs.DiskUsage and ``du -s``,
    the top directory itself counts as one inode with its blocks."""
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return Usage(size=0, inodes=0)
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    stack = [str(top)]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    # Deleted since it was listed: a running container's layer changes under us.
                    continue
                ident = (st.st_dev, st.st_ino)
                if ident in seen:
                    continue
                seen.add(ident)
                size += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))
