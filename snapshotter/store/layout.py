"""Where things live under the state root: pure path arithmetic plus directory creation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def short_name(snapshot_id: int) -> str:
    """Base-36 form of an id: short lowerdir links keep 128-layer mount options under a page."""
    if snapshot_id < 0:
        raise ValueError("snapshot ids are positive")
    out = ""
    while True:
        snapshot_id, digit = divmod(snapshot_id, 36)
        out = _DIGITS[digit] + out
        if snapshot_id == 0:
            return out


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "metadata.db"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def links(self) -> Path:
        return self.root / "l"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    @property
    def fuse(self) -> Path:
        """The one FUSE mount; each remote layer is a directory ``fuse/<layer-id>``."""
        return self.root / "fuse"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def tails(self) -> Path:
        """Saved footer/TOC ranges of remote layers, for restarts without the network."""
        return self.root / "tails"

    @property
    def slot_mark(self) -> Path:
        """The highest layer slot the FUSE mount may have handed out: a daemon that takes a live
        connection over must not give a removed layer's inode numbers to another layer."""
        return self.root / "fuse-slots"

    @property
    def index_publish(self) -> Path:
        """``[index] publish``'s copies of layer blobs while their zTOC is built."""
        return self.root / "index-publish"

    def tail(self, layer_id: str) -> Path:
        """A remote layer's saved footer/TOC ranges."""
        return self.tails / f"{layer_id}.tail"

    def tail_owner(self, path: Path) -> str:
        """The layer id a saved-ranges file belongs to."""
        return path.name.removesuffix(".tail")

    def remote_dir(self, layer_id: str) -> Path:
        return self.fuse / layer_id

    def snapshot_dir(self, snapshot_id: int) -> Path:
        return self.snapshots / str(snapshot_id)

    def fs_dir(self, snapshot_id: int) -> Path:
        return self.snapshot_dir(snapshot_id) / "fs"

    def work_dir(self, snapshot_id: int) -> Path:
        return self.snapshot_dir(snapshot_id) / "work"

    def link(self, snapshot_id: int) -> Path:
        return self.links / short_name(snapshot_id)

    def create(self) -> None:
        """Create the state directories with mode 0700: snapshot contents are root's business."""
        for path in (self.root, self.snapshots, self.links, self.trash, self.tails):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
