"""Find a secret in a daemon's state: the files under its root that hold some bytes."""

from __future__ import annotations

import os
from pathlib import Path


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """Regular files under ``root`` whose content holds ``needle``. Mount points below it are
    skipped: the lazy layers' FUSE mount is not state, and reading it would fetch every layer.
    A file removed or unreadable while the walk runs is skipped too: the daemon keeps working
    meanwhile (it empties its trash, rewrites saved state)."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not os.path.ismount(os.path.join(directory, d))]
        for name in files:
            path = Path(directory, name)
            try:
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found
