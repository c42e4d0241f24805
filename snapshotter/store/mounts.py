"""Mounts handed to containerd, built the way containerd's overlayfs snapshotter builds them (pure).

- no parent: a bind mount of the snapshot's own directory (``ro`` for a view);
- a view of one parent: a read-only bind mount of that parent;
- a view of several parents: an overlay with only lower directories, read-only by nature;
- an active snapshot with parents: an overlay with ``upperdir``/``workdir`` on local disk;
- in Kata guest-pull mode, a container's snapshot or view with parents: that overlay under a
  ``fuse.nydus-overlayfs…`` type with the Kata volume as one more option (``guest_pull_mount``).

mount(2) copies its options into one page, so ``lowerdir`` lists of many layers can overflow it.
When the absolute paths do not fit, lower directories are named by their short links
(``<root>/l/<id>``) instead; 128 of those fit for roots of up to about 20 characters (the default
``/var/lib/lazysnap`` included), and beyond that containerd's own lowerdir compaction applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from snapshotter.model import Kind, Mount
from snapshotter.store.guest_pull import VOLUME_OPTION

# The kernel's limit is one page (4096 bytes) for the whole option string including the
# terminating NUL; containerd also adds options of its own on some paths, so keep a margin.
MOUNT_OPTIONS_BUDGET = 4096 - 256


@dataclass(frozen=True, slots=True)
class LowerDir:
    path: Path  # where the layer's tree is: a local directory or a FUSE layer directory
    short: Path  # a short symbolic link to ``path``


def _options_length(options: Sequence[str]) -> int:
    return sum(len(o) for o in options) + max(len(options) - 1, 0)


def overlay_options(lowers: Sequence[LowerDir], extra: Sequence[str]) -> list[str]:
    full = [*extra, "lowerdir=" + ":".join(str(d.path) for d in lowers)]
    if _options_length(full) > MOUNT_OPTIONS_BUDGET:
        # Even when the short links overflow too (a long root), they are handed out: containerd's
        # mount.All compacts a lowerdir list over a page to paths relative to its longest common
        # directory (here ``<root>/l/``) and mounts from there, so each layer costs a few bytes.
        # The guest-pull helper does the same for its mounts (snapshotter.kata.helper).
        full = [*extra, "lowerdir=" + ":".join(str(d.short) for d in lowers)]
    return full


def _overlay(lowers: Sequence[LowerDir], extra: Sequence[str]) -> Mount:
    return Mount(type="overlay", source="overlay", options=tuple(overlay_options(lowers, extra)))


def build_mounts(
    kind: Kind, own_fs: Path, own_work: Path, parents: Sequence[LowerDir]
) -> list[Mount]:
    """Mounts for an active or view snapshot; ``parents`` are nearest first."""
    if kind is Kind.COMMITTED:
        raise ValueError("committed snapshots have no mounts")
    if not parents:
        mode = "ro" if kind is Kind.VIEW else "rw"
        return [Mount(type="bind", source=str(own_fs), options=(mode, "rbind"))]
    if kind is Kind.VIEW:
        if len(parents) == 1:
            return [Mount(type="bind", source=str(parents[0].path), options=("ro", "rbind"))]
        return [_overlay(parents, ["index=off"])]
    return [_overlay(parents, ["index=off", f"workdir={own_work}", f"upperdir={own_fs}"])]


def guest_pull_mount(
    kind: Kind, own: LowerDir, own_work: Path, parents: Sequence[LowerDir], mount_type: str,
    volume: str,
) -> Mount:
    """The single Kata guest-pull mount of a snapshot with parents (nearest first).

    The host mounts it as the overlay ``build_mounts`` would give, with one difference: a view
    of one parent is not a bind mount but an overlay over that parent and the view's own empty
    directory, since the helper mounts only overlays (and overlay needs two lowers without an
    upper directory)."""
    if kind is Kind.COMMITTED:
        raise ValueError("committed snapshots have no mounts")
    if not parents:
        raise ValueError("a guest-pull mount needs at least one parent layer")
    if kind is Kind.VIEW:
        lowers = list(parents)
        if len(lowers) == 1:
            lowers.append(own)
        options = overlay_options(lowers, ["index=off"])
    else:
        options = overlay_options(
            parents, ["index=off", f"workdir={own_work}", f"upperdir={own.path}"]
        )
    return Mount(type=mount_type, source="overlay", options=(*options, VOLUME_OPTION + volume))
