"""Mount building (pure): shapes per kind, and 128 stacked layers within a page of options."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.model import Kind, Mount
from snapshotter.store.layout import Layout, short_name
from snapshotter.store.mounts import MOUNT_OPTIONS_BUDGET, LowerDir, build_mounts
from tests.integration.snapshot_suite_support import compact_lowerdir

PAGE = 4096


def lowers(layout: Layout, ids: list[int]) -> list[LowerDir]:
    return [LowerDir(layout.fs_dir(i), layout.link(i)) for i in ids]


def length(options: tuple[str, ...] | list[str]) -> int:
    """Bytes of the comma-joined mount data, as mount(2) receives it."""
    return sum(len(o) for o in options) + max(len(options) - 1, 0)


def build(layout: Layout, kind: Kind, own: int, parents: list[int]) -> list[Mount]:
    return build_mounts(kind, layout.fs_dir(own), layout.work_dir(own), lowers(layout, parents))


def option(mount: Mount, name: str) -> str:
    (value,) = [o.split("=", 1)[1] for o in mount.options if o.startswith(name + "=")]
    return value


LAYOUT = Layout(Path("/var/lib/lazysnap"))


def test_no_parent_is_a_bind_mount_of_the_own_directory() -> None:
    assert build(LAYOUT, Kind.ACTIVE, 5, []) == [
        Mount("bind", "/var/lib/lazysnap/snapshots/5/fs", ("rw", "rbind"))]
    assert build(LAYOUT, Kind.VIEW, 5, []) == [
        Mount("bind", "/var/lib/lazysnap/snapshots/5/fs", ("ro", "rbind"))]


def test_view_of_one_parent_is_a_read_only_bind_of_the_parent() -> None:
    assert build(LAYOUT, Kind.VIEW, 5, [3]) == [
        Mount("bind", "/var/lib/lazysnap/snapshots/3/fs", ("ro", "rbind"))]


def test_view_of_several_parents_is_an_overlay_without_upperdir() -> None:
    (mount,) = build(LAYOUT, Kind.VIEW, 9, [3, 2, 1])
    assert (mount.type, mount.source) == ("overlay", "overlay")
    assert option(mount, "lowerdir") == ":".join(
        f"/var/lib/lazysnap/snapshots/{i}/fs" for i in (3, 2, 1))  # nearest first
    assert not any(o.startswith(("upperdir=", "workdir=")) for o in mount.options)
    assert "rw" not in mount.options


def test_active_with_parents_is_an_overlay_with_upper_and_work() -> None:
    (mount,) = build(LAYOUT, Kind.ACTIVE, 9, [3, 1])
    assert mount.type == "overlay"
    assert option(mount, "upperdir") == "/var/lib/lazysnap/snapshots/9/fs"
    assert option(mount, "workdir") == "/var/lib/lazysnap/snapshots/9/work"
    assert option(mount, "lowerdir") == (
        "/var/lib/lazysnap/snapshots/3/fs:/var/lib/lazysnap/snapshots/1/fs")
    assert "index=off" in mount.options


def test_committed_snapshots_have_no_mounts() -> None:
    with pytest.raises(ValueError, match="committed"):
        build(LAYOUT, Kind.COMMITTED, 1, [])


@pytest.mark.parametrize("first_id", [1, 1_000, 40_000])
@pytest.mark.parametrize("kind", [Kind.ACTIVE, Kind.VIEW])
def test_128_layers_fit_a_page_with_the_default_root(kind: Kind, first_id: int) -> None:
    parents = list(range(first_id + 127, first_id - 1, -1))
    (mount,) = build(LAYOUT, kind, first_id + 200, parents)
    assert length(mount.options) <= MOUNT_OPTIONS_BUDGET
    dirs = option(mount, "lowerdir").split(":")
    # Absolute paths would overflow: the short links are used, nearest first.
    assert dirs == [f"/var/lib/lazysnap/l/{short_name(i)}" for i in parents]


def test_full_paths_are_kept_while_they_fit() -> None:
    (mount,) = build(LAYOUT, Kind.ACTIVE, 200, list(range(20, 0, -1)))
    assert option(mount, "lowerdir").startswith("/var/lib/lazysnap/snapshots/20/fs:")


def test_a_long_root_still_mounts_128_layers_after_containerds_compaction() -> None:
    # containerd's CRI-style root for a proxy plugin; far too long for 128 absolute links.
    layout = Layout(Path("/var/lib/containerd/io.containerd.snapshotter.v1.lazysnap"))
    parents = list(range(300, 172, -1))
    (mount,) = build(layout, Kind.ACTIVE, 400, parents)  # must not raise
    assert length(mount.options) > MOUNT_OPTIONS_BUDGET
    chdir, compacted = compact_lowerdir(mount.options)
    assert chdir == str(layout.links) + "/"
    assert length(compacted) <= MOUNT_OPTIONS_BUDGET
    assert option(Mount("overlay", "overlay", tuple(compacted)), "lowerdir").split(":") == [
        short_name(i) for i in parents]


@settings(max_examples=300, deadline=None)
@given(
    root_length=st.integers(min_value=1, max_value=200),
    count=st.integers(min_value=1, max_value=128),
    first_id=st.integers(min_value=1, max_value=10**7),
    kind=st.sampled_from([Kind.ACTIVE, Kind.VIEW]),
)
def test_any_stack_of_up_to_128_layers_is_mountable(
    root_length: int, count: int, first_id: int, kind: Kind
) -> None:
    layout = Layout(Path("/" + "r" * (root_length - 1)))
    parents = list(range(first_id + count - 1, first_id - 1, -1))
    mounts = build(layout, kind, first_id + count, parents)
    assert len(mounts) == 1
    (mount,) = mounts
    if mount.type == "bind":
        assert kind is Kind.VIEW and count == 1
        return
    if length(mount.options) <= MOUNT_OPTIONS_BUDGET:
        return  # fits one page as it is
    # Otherwise what containerd's mount.All makes of it fits (it compacts at a page - 512).
    assert sum(len(o) for o in mount.options) >= PAGE - 512 or length(mount.options) < PAGE
    _, compacted = compact_lowerdir(mount.options)
    assert length(compacted) <= MOUNT_OPTIONS_BUDGET
