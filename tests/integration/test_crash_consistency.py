"""SIGKILL the daemon in the middle of Prepare/Commit/Remove traffic, many times over.

After every restart: each snapshot whose Commit returned OK is there with its labels, each
Remove that returned OK stuck, an interrupted Commit left exactly one of (active key, committed
name), every listed snapshot is whole (known kind, committed parent, its directories exist,
its mounts point at existing directories), and after Cleanup no directory under
``<root>/snapshots/`` lacks a row.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter._proto import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.store.snapshots import Snapshotter
from tests.integration.snapshot_suite_support import Client, daemon_in, short_tmpdir, status_of
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROUNDS = 20
KINDS = {snapshots_pb2.ACTIVE, snapshots_pb2.VIEW, snapshots_pb2.COMMITTED}


@dataclass
class Model:
    """What the client knows for certain, and what a kill left undecided."""

    committed: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    removed: set[str] = field(default_factory=set)
    # (active key, committed name, labels) of Commits cut short by the kill
    uncertain_commits: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    uncertain_removes: set[str] = field(default_factory=set)
    operations: int = 0


def _traffic(address: Path, model: Model, round_: int, stop: threading.Event) -> None:
    """Prepare/Commit/View/Cleanup/Remove loops until the daemon dies under us."""
    rng = random.Random(round_)
    with grpc.insecure_channel(f"unix:{address}") as channel:
        c = Client(snapshots_pb2_grpc.SnapshotsStub(channel))
        j = 0
        while not stop.is_set():
            j += 1
            key = f"r{round_}/active {j}"
            name = f"r{round_}/committed {j}"
            parent = rng.choice(["", *sorted(model.committed)[-8:]])
            labels = {"containerd.io/snapshot.ref": name, "round": str(round_), "j": str(j)}
            try:
                c.prepare(key, parent, {"prepared": "yes"})
            except grpc.RpcError:
                return
            try:
                c.commit(name, key, labels)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                model.uncertain_commits.append((key, name, labels))
                return
            model.committed[name] = labels
            model.operations += 1
            if rng.random() < 0.3:
                try:
                    c.view(f"r{round_}/view {j}", name)
                except grpc.RpcError:
                    return
            if rng.random() < 0.1:
                try:
                    c.cleanup()  # concurrent with nothing here, but killed mid-way sometimes
                except grpc.RpcError:
                    return
            if rng.random() < 0.4:
                victim = rng.choice(sorted(model.committed))
                try:
                    c.remove(victim)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        continue  # it has children
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    model.uncertain_removes.add(victim)
                    return
                del model.committed[victim]
                model.removed.add(victim)
                model.operations += 1


def _rows(root: Path) -> dict[int, tuple[str, int]]:
    connection = sqlite3.connect(f"file:{root / 'metadata.db'}?mode=ro", uri=True)
    try:
        return {row[0]: (row[1], row[2])
                for row in connection.execute("SELECT id, key, kind FROM snapshots")}
    finally:
        connection.close()


def _mount_paths(mounts: Sequence[Any]) -> list[str]:
    """Directories named by mounts (protobuf or domain ones: both have type/source/options)."""
    paths: list[str] = []
    for m in mounts:
        if m.type == "bind":
            paths.append(m.source)
        for option in m.options:
            key, _, value = option.partition("=")
            if key in ("upperdir", "workdir"):
                paths.append(value)
            elif key == "lowerdir":
                paths.extend(value.split(":"))
    return paths


def _settle_uncertain(c: Client, model: Model) -> None:
    for key, name, labels in model.uncertain_commits:
        found = []
        for k in (key, name):
            try:
                found.append((k, c.stat(k)))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
        # A Commit is atomic: the active key or the committed name, never both, never neither.
        assert len(found) == 1, (key, name, found)
        k, info = found[0]
        if k == name:
            assert info.kind == snapshots_pb2.COMMITTED
            assert dict(info.labels) == labels
            model.committed[name] = labels
        else:
            assert info.kind == snapshots_pb2.ACTIVE
            assert dict(info.labels) == {"prepared": "yes"}
    model.uncertain_commits.clear()
    for victim in model.uncertain_removes:
        try:
            c.stat(victim)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            del model.committed[victim]
            model.removed.add(victim)
    model.uncertain_removes.clear()


def _check(c: Client, daemon: Daemon, model: Model) -> None:
    _settle_uncertain(c, model)
    for name, labels in model.committed.items():
        info = c.stat(name)
        assert info.kind == snapshots_pb2.COMMITTED, name
        assert dict(info.labels) == labels, name
    for name in model.removed:
        assert status_of(lambda: c.stat(name))[0] == grpc.StatusCode.NOT_FOUND  # noqa: B023

    infos = {i.name: i for i in c.list()}
    for info in infos.values():
        assert info.kind in KINDS
        if info.parent:
            assert infos[info.parent].kind == snapshots_pb2.COMMITTED, info
        if info.kind != snapshots_pb2.COMMITTED:
            missing = [p for p in _mount_paths(c.mounts(info.name)) if not os.path.isdir(p)]
            assert not missing, (info.name, missing)

    rows = _rows(daemon.root)
    assert {key for key, _ in rows.values()} == set(infos)
    snapshots = daemon.root / "snapshots"
    for snapshot_id, (key, kind) in rows.items():
        assert (snapshots / str(snapshot_id) / "fs").is_dir(), key
        if kind == snapshots_pb2.ACTIVE:
            assert (snapshots / str(snapshot_id) / "work").is_dir(), key

    c.cleanup()
    assert set(os.listdir(snapshots)) == {str(i) for i in rows}
    assert os.listdir(daemon.root / "trash") == []


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def test_sigkill_mid_operation_loses_nothing_committed(workdir: Path) -> None:
    model = Model()
    rng = random.Random(1234)
    with daemon_in(workdir / "d") as daemon:
        for round_ in range(ROUNDS):
            stop = threading.Event()
            before = model.operations
            worker = threading.Thread(
                target=_traffic, args=(daemon.address, model, round_, stop), daemon=True)
            worker.start()
            # Kill at a random moment of steady traffic (not while the client still connects,
            # which a loaded machine could stretch past the whole window).
            deadline = time.monotonic() + 20
            while model.operations == before and worker.is_alive():
                assert time.monotonic() < deadline, "no traffic"
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.2))
            daemon.kill9()
            stop.set()
            worker.join(timeout=30)
            assert not worker.is_alive()
            daemon.start()
            with daemon.snapshots() as stub:
                _check(Client(stub), daemon, model)
    assert model.operations > ROUNDS, "the traffic never got going"
    assert model.removed, "no Remove ever completed"


# -- deterministic crash points -------------------------------------------------------------
#
# The random kills above rarely land inside the few instructions between a directory change and
# the sqlite COMMIT. Here a child process runs one operation with a hook that dies (os._exit)
# right after a chosen step, and the parent reopens the root and checks the same invariants.

_CRASH_SCRIPT = """
import inspect, os, sys
from pathlib import Path
from typing import Any
from snapshotter.store import snapshots
from snapshotter.store.metadata import Transaction

root, point, op = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sn = snapshots.Snapshotter(root)
owner = Transaction if point == "commit_snapshot" else snapshots.Snapshotter
original = getattr(owner, point)

def dying(*args, **kwargs):
    result = original(*args, **kwargs)
    os._exit(9)

static = isinstance(inspect.getattr_static(owner, point), staticmethod)
setattr(owner, point, staticmethod(dying) if static else dying)
if op == "prepare":
    sn.prepare("victim", "base", {"k": "v"})
elif op == "commit":
    sn.commit("victim-committed", "victim", {"k": "committed"})
elif op == "remove":
    sn.remove("victim")
sys.exit(0)
"""


def _crash_at(root: Path, point: str, op: str) -> None:
    result = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(root), point, op],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr


@pytest.mark.parametrize(("op", "point"), [
    ("prepare", "_make_dirs"),
    ("commit", "commit_snapshot"),
    ("commit", "_committable"),
    ("remove", "_trash"),
    ("remove", "_trash_path"),
    ("remove", "_empty_trash"),
])
def test_crash_at_each_step_leaves_whole_snapshots(workdir: Path, op: str, point: str) -> None:
    root = workdir / "root"
    sn = Snapshotter(root)
    try:
        sn.prepare("base-active", "", {})
        sn.commit("base", "base-active", {})
        if op != "prepare":
            sn.prepare("victim", "base", {"k": "v"})
    finally:
        sn.close()

    _crash_at(root, point, op)

    sn = Snapshotter(root)
    try:
        rows = _rows(root)
        for snapshot_id, (key, kind) in rows.items():
            assert (root / "snapshots" / str(snapshot_id) / "fs").is_dir(), (point, key)
            if kind == snapshots_pb2.ACTIVE:
                assert (root / "snapshots" / str(snapshot_id) / "work").is_dir(), (point, key)
            if kind != snapshots_pb2.COMMITTED:
                missing = [p for p in _mount_paths(sn.mounts(key)) if not os.path.isdir(p)]
                assert not missing, (point, key, missing)
        keys = {key for key, _ in rows.values()}
        if op == "commit":
            assert len(keys & {"victim", "victim-committed"}) == 1
        sn.cleanup()
        assert set(os.listdir(root / "snapshots")) == {str(i) for i in rows}
        # The interrupted operation can be redone (or its effect is already there).
        if op == "prepare" and "victim" not in keys:
            sn.prepare("victim", "base", {})
        if op == "remove" and "victim" in keys:
            sn.remove("victim")
        if op == "commit" and "victim" in keys:
            sn.commit("victim-committed", "victim", {})
    finally:
        sn.close()


def test_cleanup_racing_a_prepare_that_reuses_a_crashed_id_keeps_its_link(workdir: Path) -> None:
    # A Prepare killed before its COMMIT leaves <root>/snapshots/N and <root>/l/<N> behind, and
    # sqlite hands the id N out again. A Cleanup that judged those orphans must not remove the
    # new snapshot N's short link once the lock is released (128-layer mounts need the links).
    root = workdir / "root"
    sn = Snapshotter(root)
    sn.prepare("base-active", "", {})
    sn.commit("base", "base-active", {})
    _crash_at(root, "_make_dirs", "prepare")  # leaves id 2's directory and link, no row
    sn.close()
    sn = Snapshotter(root)
    orphan_link = sn.layout.link(2)
    assert orphan_link.is_symlink()

    judged = threading.Event()
    prepared = threading.Event()
    original = Snapshotter._empty_trash

    def paused_empty_trash(path: Path) -> None:
        # The first deletion after Cleanup's transaction waits until Prepare has reused id 2.
        if not judged.is_set():
            judged.set()
            assert prepared.wait(timeout=30)
        original(path)

    try:
        Snapshotter._empty_trash = staticmethod(paused_empty_trash)  # type: ignore[method-assign]
        cleaner = threading.Thread(target=sn.cleanup)
        cleaner.start()
        assert judged.wait(timeout=30)
        sn.prepare("reuser", "base", {})
        prepared.set()
        cleaner.join(timeout=30)
        assert not cleaner.is_alive()
    finally:
        Snapshotter._empty_trash = staticmethod(original)  # type: ignore[method-assign]
    try:
        (reuser_id,) = [i for i, (key, _) in _rows(root).items() if key == "reuser"]
        assert reuser_id == 2
        assert sn.layout.link(2).is_symlink()
        assert sn.layout.link(2).resolve() == sn.layout.fs_dir(2).resolve()
        assert sn.layout.fs_dir(2).is_dir()
    finally:
        sn.close()
