"""Error codes, label rules, filters, Usage and Cleanup over the gRPC socket of a real daemon.

containerd turns the proxy's status codes into errdefs classes and relies on the exact class
(containerd-protocol.md §1.1); the messages are kept.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from snapshotter._proto import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.labels import MAX_LABEL_BYTES
from tests.integration.snapshot_suite_support import (
    SNAPSHOT_REF,
    Client,
    daemon_in,
    mounted,
    names,
    short_tmpdir,
    status_of,
)
from tests.support.daemon import Daemon

pytestmark = pytest.mark.root

NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def daemon(workdir: Path) -> Iterator[Daemon]:
    with daemon_in(workdir / "d") as running:
        yield running


@pytest.fixture
def c(daemon: Daemon) -> Iterator[Client]:
    with daemon.snapshots() as stub:
        yield Client(stub)


def _ns(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def _committed(c: Client, name: str, parent: str = "", labels: dict[str, str] | None = None) -> str:
    c.prepare(f"{name}-active", parent)
    c.commit(name, f"{name}-active", labels)
    return name


def _snapshot_dirs(daemon: Daemon) -> set[str]:
    return set(os.listdir(daemon.root / "snapshots"))


# -- creating ----------------------------------------------------------------------------


def test_prepare_or_view_on_an_existing_key_is_already_exists(c: Client) -> None:
    _committed(c, "base")
    c.prepare("active")
    c.view("view", "base")
    for key in ("active", "view", "base"):
        for create in (c.prepare, c.view):
            code, message = status_of(lambda: create(key, ""))  # noqa: B023
            assert code == ALREADY_EXISTS, (key, create)
            assert key in message
    # Nothing was changed by the failed calls.
    assert [(i.name, i.kind) for i in sorted(c.list(), key=lambda i: i.name)] == [
        ("active", snapshots_pb2.ACTIVE), ("base", snapshots_pb2.COMMITTED),
        ("view", snapshots_pb2.VIEW)]


def test_missing_parent_is_not_found(c: Client, daemon: Daemon) -> None:
    before = _snapshot_dirs(daemon)
    for create in (c.prepare, c.view):
        code, message = status_of(lambda: create("child", "no-such-parent"))  # noqa: B023
        assert code == NOT_FOUND
        assert "no-such-parent" in message
    assert c.list() == []
    assert _snapshot_dirs(daemon) == before


def test_parent_not_committed_is_invalid_argument(c: Client) -> None:
    _committed(c, "base")
    c.prepare("active", "base")
    c.view("view", "base")
    for parent in ("active", "view"):
        for create in (c.prepare, c.view):
            code, _ = status_of(lambda: create("child", parent))  # noqa: B023
            assert code == INVALID_ARGUMENT, (parent, create)
    assert status_of(lambda: c.stat("child"))[0] == NOT_FOUND


def test_empty_key_is_invalid_argument(c: Client) -> None:
    _committed(c, "base")
    c.prepare("active", "base")
    calls = {
        "prepare": lambda: c.prepare(""),
        "view": lambda: c.view("", "base"),
        "mounts": lambda: c.mounts(""),
        "commit-key": lambda: c.commit("name", ""),
        "commit-name": lambda: c.commit("", "active"),
        "remove": lambda: c.remove(""),
        "stat": lambda: c.stat(""),
        "usage": lambda: c.usage(""),
        "update": lambda: c.update(snapshots_pb2.Info(name="", labels={"a": "b"})),
    }
    for what, call in calls.items():
        assert status_of(call)[0] == INVALID_ARGUMENT, what
    assert c.stat("active").kind == snapshots_pb2.ACTIVE


# -- mounts and commit ---------------------------------------------------------------------


def test_mounts(c: Client) -> None:
    _committed(c, "base")
    assert status_of(lambda: c.mounts("base"))[0] == FAILED_PRECONDITION
    assert status_of(lambda: c.mounts("missing"))[0] == NOT_FOUND
    # Mounts of an active or a view is what Prepare/View returned.
    assert c.prepare("active", "base") == c.mounts("active")
    assert c.view("view", "base") == c.mounts("view")


def test_commit_errors(c: Client) -> None:
    _committed(c, "base")
    c.view("view", "base")
    c.prepare("active", "base", {"k": "v"})
    code, _ = status_of(lambda: c.commit("from-view", "view"))
    assert code == FAILED_PRECONDITION
    code, _ = status_of(lambda: c.commit("base", "active"))
    assert code == ALREADY_EXISTS
    code, _ = status_of(lambda: c.commit("view", "active"))
    assert code == ALREADY_EXISTS
    code, _ = status_of(lambda: c.commit("x", "missing"))
    assert code == NOT_FOUND
    code, _ = status_of(lambda: c.commit("base", "missing"))
    assert code == NOT_FOUND  # the key is looked up before the name
    # The failed commits changed nothing.
    assert (c.stat("active").kind, dict(c.stat("active").labels)) == (snapshots_pb2.ACTIVE,
                                                                       {"k": "v"})
    assert c.stat("view").kind == snapshots_pb2.VIEW
    assert names(c.list()) == ["active", "base", "view"]


def test_commit_of_a_committed_snapshot_is_failed_precondition(c: Client) -> None:
    _committed(c, "base")
    assert status_of(lambda: c.commit("again", "base"))[0] == FAILED_PRECONDITION


def test_commit_replaces_labels_and_resets_timestamps(c: Client) -> None:
    c.prepare("active", "", {"from-prepare": "1", "shared": "prepare"})
    before = c.stat("active")
    assert _ns(before.created_at) == _ns(before.updated_at)
    time.sleep(0.01)
    c.commit("done", "active", {"shared": "commit", "containerd.io/gc.root": "x"})
    after = c.stat("done")
    assert dict(after.labels) == {"shared": "commit", "containerd.io/gc.root": "x"}
    assert _ns(after.created_at) == _ns(after.updated_at) > _ns(before.created_at)
    c.prepare("active2")
    c.commit("done2", "active2")
    assert dict(c.stat("done2").labels) == {}


# -- remove ------------------------------------------------------------------------------


def test_remove_errors(c: Client, daemon: Daemon) -> None:
    assert status_of(lambda: c.remove("missing"))[0] == NOT_FOUND
    _committed(c, "base")
    c.prepare("child", "base")
    code, message = status_of(lambda: c.remove("base"))
    assert code == FAILED_PRECONDITION
    assert "remove" in message
    c.view("view", "base")
    c.remove("child")
    code, message = status_of(lambda: c.remove("base"))
    assert code == FAILED_PRECONDITION  # a view is a child too
    assert "remove" in message
    c.remove("view")
    c.remove("base")
    assert c.list() == []
    assert _snapshot_dirs(daemon) == set()
    assert status_of(lambda: c.remove("base"))[0] == NOT_FOUND


# -- update ------------------------------------------------------------------------------


def test_update_of_a_non_label_field_is_invalid_argument(c: Client) -> None:
    _committed(c, "base", labels={"a": "1"})
    c.prepare("active", "base")
    info = c.stat("active")
    for path in ("parent", "name", "kind", "created_at", "updated_at", "label", "labelsx"):
        info.parent = ""
        code, message = status_of(lambda: c.update(info, path))  # noqa: B023
        assert code == INVALID_ARGUMENT, path
        assert path in message
    assert c.stat("active") == info.__class__(
        name="active", parent="base", kind=snapshots_pb2.ACTIVE,
        created_at=info.created_at, updated_at=info.updated_at)
    assert status_of(lambda: c.update(snapshots_pb2.Info(name="missing")))[0] == NOT_FOUND


def test_update_label_semantics(c: Client) -> None:
    c.prepare("active", "", {"keep": "k", "drop": "d"})
    created = c.stat("active")
    created_ns = _ns(created.created_at)
    last = _ns(created.updated_at)

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        nonlocal last
        info = snapshots_pb2.Info(name="active", labels=labels, parent="ignored",
                                  kind=snapshots_pb2.COMMITTED)
        result = c.update(info, *paths)
        stat = c.stat("active")
        assert result == stat
        assert (stat.kind, stat.parent) == (snapshots_pb2.ACTIVE, "")
        assert _ns(stat.created_at) == created_ns
        assert _ns(stat.updated_at) > last
        last = _ns(stat.updated_at)
        return dict(stat.labels)

    # No paths: all labels replaced.
    assert update({"a": "1", "b": "2"}) == {"a": "1", "b": "2"}
    # labels.k: set from info, or deleted when absent from info; other labels untouched.
    assert update({"a": "10", "c": "3", "z": "not asked"}, "labels.a", "labels.c") == {
        "a": "10", "b": "2", "c": "3"}
    assert update({}, "labels.b") == {"a": "10", "c": "3"}
    assert update({}, "labels.never-set") == {"a": "10", "c": "3"}
    # Keys holding dots: everything after "labels." is the key.
    assert update({"containerd.io/gc.root": "r"}, "labels.containerd.io/gc.root") == {
        "a": "10", "c": "3", "containerd.io/gc.root": "r"}
    # labels: replace all.
    assert update({"only": "this"}, "labels") == {"only": "this"}
    assert update({}, "labels") == {}


# -- labels ------------------------------------------------------------------------------


def test_labels_over_4096_bytes_are_invalid_argument(c: Client) -> None:
    key = "containerd.io/snapshot/big"
    fits = {key: "x" * (4096 - len(key))}
    too_big = {key: "x" * (4097 - len(key))}
    multibyte = {key: "é" * ((4097 - len(key)) // 2 + 1)}  # counted in bytes, not characters
    _committed(c, "base")
    c.prepare("ok-active", "base", fits)
    assert dict(c.stat("ok-active").labels) == fits
    c.prepare("for-commit")
    for labels in (too_big, multibyte):
        assert status_of(lambda: c.prepare("bad", "", labels))[0] == INVALID_ARGUMENT  # noqa: B023
        assert status_of(lambda: c.view("bad", "base", labels))[0] == INVALID_ARGUMENT  # noqa: B023
        code, message = status_of(lambda: c.commit("bad", "for-commit", labels))  # noqa: B023
        assert code == INVALID_ARGUMENT
        assert "4096" in message
        info = snapshots_pb2.Info(name="ok-active", labels=labels)
        assert status_of(lambda: c.update(info))[0] == INVALID_ARGUMENT  # noqa: B023
        assert status_of(lambda: c.update(info, f"labels.{key}"))[0] == INVALID_ARGUMENT  # noqa: B023
    assert status_of(lambda: c.stat("bad"))[0] == NOT_FOUND
    assert c.stat("for-commit").kind == snapshots_pb2.ACTIVE
    assert dict(c.stat("ok-active").labels) == fits
    c.commit("committed-fits", "for-commit", fits)
    assert dict(c.stat("committed-fits").labels) == fits


def test_empty_label_key_is_invalid_argument(c: Client) -> None:
    assert status_of(lambda: c.prepare("x", "", {"": "v"}))[0] == INVALID_ARGUMENT


# containerd's own backend keys look like "default/12/extract-123 sha256:...".
ODD_KEYS = [
    "../x",
    "../../../../../../tmp/escaped",
    "/etc/passwd",
    "a/b c",
    "with\nnewline",
    "tab\there",
    "spaces   ",
    " ",
    ".",
    "..",
    "ünïcødé/ключ/鍵/🙂",
    "default/12/extract-123456789-AbCd sha256:" + "0" * 64,
    'quote"and\\backslash',
    "nul\x00inside",
    "k" * 5000,
]


def test_path_like_keys_are_stored_verbatim_and_create_nothing_outside_the_root(
    c: Client, daemon: Daemon, workdir: Path
) -> None:
    outside_before = sorted(p for p in workdir.rglob("*") if daemon.root not in p.parents)
    passwd = os.stat("/etc/passwd")
    parent = ""
    for i, key in enumerate(ODD_KEYS):
        c.prepare(key, parent, {key[:100] or "k": key[:2000]})
        assert c.stat(key).name == key
        name = f"{key}#committed" if i % 2 else key[::-1] + "#c"
        c.commit(name, key, {"orig": key[:2000]})
        info = c.stat(name)
        assert (info.name, info.parent, dict(info.labels)) == (name, parent, {"orig": key[:2000]})
        parent = name
    listed = {i.name for i in c.list()}
    assert len(listed) == len(ODD_KEYS)
    # Views of the odd chain mount and work.
    mounts = c.view("v", parent)
    with mounted(mounts, workdir / "m"):
        pass
    (workdir / "m").rmdir()
    outside_after = sorted(p for p in workdir.rglob("*") if daemon.root not in p.parents)
    assert outside_after == outside_before
    assert not Path("/tmp/escaped").exists()
    assert os.stat("/etc/passwd").st_mtime_ns == passwd.st_mtime_ns
    # Inside the root only numeric snapshot directories exist.
    assert all(d.isdigit() for d in _snapshot_dirs(daemon))
    c.remove("v")
    # Remove leaf first along the chain.
    chain = []
    key = parent
    while key:
        chain.append(key)
        key = c.stat(key).parent
    for key in chain:
        c.remove(key)
    assert c.list() == []


# -- list and filters --------------------------------------------------------------------


@pytest.fixture
def populated(c: Client) -> Client:
    chain = "sha256:" + "a" * 64
    _committed(c, "base", labels={"containerd.io/gc.root": "x"})
    _committed(c, chain, parent="base", labels={SNAPSHOT_REF: chain, "team": "blue"})
    c.prepare("default/3/extract-1 sha256:x", "base", {SNAPSHOT_REF: "other", "team": "red"})
    c.view('v "quoted"', chain, {"team": "blue-green"})
    c.prepare("plain")
    return c


FILTER_CASES: list[tuple[list[str], set[str]]] = [
    ([], {"base", "sha256:" + "a" * 64, "default/3/extract-1 sha256:x", 'v "quoted"', "plain"}),
    ([""], {"base", "sha256:" + "a" * 64, "default/3/extract-1 sha256:x", 'v "quoted"', "plain"}),
    (["name==base"], {"base"}),
    (['name=="default/3/extract-1 sha256:x"'], {"default/3/extract-1 sha256:x"}),
    (['name=="v \\"quoted\\""'], {'v "quoted"'}),
    (["parent==base"], {"sha256:" + "a" * 64, "default/3/extract-1 sha256:x"}),
    (['parent==""'], {"base", "plain"}),
    (["kind==active"], {"default/3/extract-1 sha256:x", "plain"}),
    (["kind==view"], {'v "quoted"'}),
    (["kind==committed"], {"base", "sha256:" + "a" * 64}),
    ([f'labels."{SNAPSHOT_REF}"==sha256:{"a" * 64}'], {"sha256:" + "a" * 64}),
    ([f'labels."{SNAPSHOT_REF}"'], {"sha256:" + "a" * 64, "default/3/extract-1 sha256:x"}),
    (["labels.team!=blue"], {"base", "default/3/extract-1 sha256:x", 'v "quoted"', "plain"}),
    (['labels.team!=""'], {"sha256:" + "a" * 64, "default/3/extract-1 sha256:x", 'v "quoted"'}),
    (["labels.team~=^blue"], {"sha256:" + "a" * 64, 'v "quoted"'}),
    (["labels.team~=e.*n"], {'v "quoted"'}),
    (["name~=sha256"], {"sha256:" + "a" * 64, "default/3/extract-1 sha256:x"}),
    (["kind==active,labels.team"], {"default/3/extract-1 sha256:x"}),
    (["kind==active,labels.team==blue"], set()),
    (["kind==view", "name==base", "name==nothing"], {'v "quoted"', "base"}),
    (["labels.nothing"], set()),
    (["unknownfield==x"], set()),
    (["unknownfield!=x"], {"base", "sha256:" + "a" * 64, "default/3/extract-1 sha256:x",
                           'v "quoted"', "plain"}),
    # containerd's remote-snapshot lookup (core/metadata/snapshot.go), parent key %q-quoted.
    ([f'labels."{SNAPSHOT_REF}"==sha256:{"a" * 64},parent=="base"'], {"sha256:" + "a" * 64}),
    ([f'labels."{SNAPSHOT_REF}"==sha256:{"a" * 64},parent=="other"'], set()),
    ([f'labels."{SNAPSHOT_REF}"==other,parent=="base"'], {"default/3/extract-1 sha256:x"}),
]


def test_list_filters(populated: Client) -> None:
    # One daemon for all cases (a daemon per case would cost a second each).
    wrong = {tuple(filters): (set(names(populated.list(*filters))), expected)
             for filters, expected in FILTER_CASES}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong, wrong


MALFORMED = [
    "name==", "name=", "==x", "name==x,", ",name==x", "labels.", 'labels."open==x',
    "name~=(", "name~=a{99999999999}", 'name=="\\q"', 'name=="\\U00110000"', "name==x y==z",
    "a..b",
]


def test_malformed_filter_is_invalid_argument(c: Client) -> None:
    c.prepare("something")
    for bad in MALFORMED:
        code, message = status_of(lambda: c.list("name==something", bad))  # noqa: B023
        assert code == INVALID_ARGUMENT, bad
        assert "filter" in message, bad


def test_a_backtracking_filter_does_not_freeze_the_daemon(c: Client, daemon: Daemon) -> None:
    # With Python's re this filter takes about 2**60 steps holding the interpreter lock.
    c.prepare("a" * 60)
    started = time.monotonic()
    assert c.list(r"name~=/(\w|\w)*!/") == []
    assert time.monotonic() - started < 5
    assert daemon.healthy()


def test_list_streams_more_than_100_results(c: Client) -> None:
    _committed(c, "base")
    expected = {"base", "base-active"} - {"base-active"}
    for i in range(249):
        key = f"child-{i:03d}"
        c.view(key, "base", {"i": str(i)})
        expected.add(key)
    blocks = c.list_blocks()
    assert blocks == [100, 100, 50]
    infos = c.list()
    assert len(infos) == 250
    assert {i.name for i in infos} == expected
    assert all(dict(i.labels) == {"i": i.name.split("-")[1].lstrip("0") or "0"}
               for i in infos if i.name != "base")
    assert c.list_blocks("kind==view") == [100, 100, 49]
    assert c.list_blocks("name==nothing") == []


def test_list_of_snapshots_with_large_labels_fits_containerds_message_limit(
    daemon: Daemon,
) -> None:
    # 120 snapshots of 42 near-limit labels each: 100 of them alone encode to over 17 MB.
    value = "v" * (MAX_LABEL_BYTES - 8)
    labels = {f"big-{n:03d}": value for n in range(42)}
    with daemon.snapshots() as stub:
        _committed(Client(stub), "base")
        for i in range(120):
            Client(stub).view(f"large-{i:03d}", "base", labels)
    # containerd reads a proxy's List stream with a 16 MiB limit; a gRPC default client with 4.
    for limit in (16 * 1024 * 1024, 4 * 1024 * 1024):
        options = [("grpc.max_receive_message_length", limit)]
        with grpc.insecure_channel(f"unix:{daemon.address}", options=options) as channel:
            stub = snapshots_pb2_grpc.SnapshotsStub(channel)
            request = snapshots_pb2.ListSnapshotsRequest(snapshotter="lazysnap")
            responses = list(stub.List(request, timeout=60))
        assert all(r.ByteSize() <= limit for r in responses)
        names = [i.name for r in responses for i in r.info]
        assert sorted(names) == ["base", *(f"large-{i:03d}" for i in range(120))]
        assert all(dict(i.labels) == labels for r in responses for i in r.info if i.name != "base")


# -- usage -------------------------------------------------------------------------------


def test_usage(c: Client, daemon: Daemon, workdir: Path) -> None:
    assert status_of(lambda: c.usage("missing"))[0] == NOT_FOUND
    before = _snapshot_dirs(daemon)
    mounts = c.prepare("active")
    (snapshot_id,) = _snapshot_dirs(daemon) - before
    top = daemon.root / "snapshots" / snapshot_id / "fs"
    # As containerd's fs.DiskUsage (and du -s): the snapshot's own root directory counts.
    assert c.usage("active") == (os.lstat(top).st_blocks * 512, 1)
    with mounted(mounts, workdir / "m") as target:
        (target / "file").write_bytes(b"x" * 65536)
        (target / "dir").mkdir()
        (target / "dir" / "small").write_bytes(b"y")
        os.link(target / "file", target / "dir" / "hardlink")  # one inode, counted once
    (workdir / "m").rmdir()
    size, inodes = c.usage("active")
    assert inodes == 4  # root, file (= hardlink), dir, small
    assert 65536 + 1 <= size <= 65536 + 4 * 8192
    c.commit("committed", "active")
    assert c.usage("committed") == (size, inodes)
    # Stored at commit: the committed layer is not walked again.
    (daemon.root / "snapshots" / snapshot_id / "fs" / "late").write_bytes(b"z" * 100000)
    assert c.usage("committed") == (size, inodes)
    # A child's usage is its own, excluding the parent.
    child_mounts = c.prepare("child", "committed")
    assert c.usage("child")[1] == 1
    assert c.usage("child")[0] <= 8192
    with mounted(child_mounts, workdir / "m") as target:
        (target / "new").write_bytes(b"n" * 4096)
    (workdir / "m").rmdir()
    child_size, child_inodes = c.usage("child")
    assert child_inodes == 2
    assert 4096 <= child_size <= 4096 + 2 * 8192
    c.view("view", "committed")
    assert c.usage("view")[1] == 1


# -- cleanup -----------------------------------------------------------------------------


def test_cleanup_removes_only_orphaned_snapshot_directories(
    c: Client, daemon: Daemon, workdir: Path
) -> None:
    _committed(c, "base")
    mounts = c.prepare("active", "base")
    with mounted(mounts, workdir / "m") as target:
        (target / "data").write_bytes(b"keep me")
    (workdir / "m").rmdir()
    c.view("view", "base")
    owned = _snapshot_dirs(daemon)
    snapshots = daemon.root / "snapshots"
    (snapshots / "999999" / "fs" / "deep").mkdir(parents=True)
    (snapshots / "999999" / "fs" / "deep" / "file").write_bytes(b"orphan")
    (snapshots / "junk-dir").mkdir()
    (snapshots / "stray-file").write_bytes(b"")
    (daemon.root / "not-a-snapshot").write_bytes(b"outside snapshots/")
    root_entries = set(os.listdir(daemon.root))
    owned_links = {p.name: os.readlink(p) for p in (daemon.root / "l").iterdir()}
    assert len(owned_links) == len(owned)

    c.cleanup()

    assert _snapshot_dirs(daemon) == owned
    assert {p.name: os.readlink(p) for p in (daemon.root / "l").iterdir()} == owned_links
    assert set(os.listdir(daemon.root)) == root_entries
    assert (daemon.root / "not-a-snapshot").read_bytes() == b"outside snapshots/"
    # Every snapshot still works.
    assert names(c.list()) == ["active", "base", "view"]
    with mounted(c.mounts("active"), workdir / "m") as target:
        assert (target / "data").read_bytes() == b"keep me"
    (workdir / "m").rmdir()
    c.commit("active-committed", "active")
    c.cleanup()
    assert len(_snapshot_dirs(daemon)) == len(owned)


def test_usage_of_an_active_snapshot_under_churn(c: Client, workdir: Path) -> None:
    # CRI polls Usage of running containers' snapshots: files vanishing during the walk are
    # not errors.
    mounts = c.prepare("busy")
    stop = threading.Event()
    failures: list[tuple[grpc.StatusCode, str]] = []
    with mounted(mounts, workdir / "m") as target:
        churn = target / "churn"
        churn.mkdir()

        def churning() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                sub = churn / f"d{i % 7}"
                sub.mkdir(exist_ok=True)
                for n in range(20):
                    (sub / f"f{n}").write_bytes(b"x")
                shutil.rmtree(sub)

        worker = threading.Thread(target=churning)
        worker.start()
        try:
            deadline = time.monotonic() + 4
            calls = 0
            while time.monotonic() < deadline:
                calls += 1
                try:
                    size, inodes = c.usage("busy")
                    assert size >= 0 and inodes >= 1
                except grpc.RpcError as exc:
                    failures.append((exc.code(), exc.details() or ""))
        finally:
            stop.set()
            worker.join()
    (workdir / "m").rmdir()
    assert calls > 20
    assert not failures, failures[:3]


def _race(calls: Sequence[Callable[[], object]]) -> list[grpc.StatusCode]:
    """Start all calls at once; return each one's status code (OK for success)."""
    barrier = threading.Barrier(len(calls))
    codes: list[grpc.StatusCode] = [grpc.StatusCode.UNKNOWN] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            calls[i]()
            codes[i] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[i] = exc.code()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return codes


def test_concurrent_callers_get_one_winner_and_clean_errors(
    c: Client, daemon: Daemon, workdir: Path
) -> None:
    _committed(c, "base")
    codes = _race([lambda: c.prepare("same", "base")] * 8 + [lambda: c.view("same", "base")] * 4)
    assert codes.count(grpc.StatusCode.OK) == 1
    assert set(codes) == {grpc.StatusCode.OK, ALREADY_EXISTS}

    c.prepare("for-commit", "base")
    codes = _race([functools.partial(c.commit, f"name-{i}", "for-commit") for i in range(8)])
    assert codes.count(grpc.StatusCode.OK) == 1
    assert set(codes) <= {grpc.StatusCode.OK, NOT_FOUND, FAILED_PRECONDITION}
    assert len([n for n in names(c.list()) if n.startswith("name-")]) == 1

    # Commit (which measures the layer outside its transaction) racing Remove of the same key.
    for round_ in range(3):
        key = f"big-{round_}"
        with mounted(c.prepare(key, "base"), workdir / "m") as target:
            for d in range(20):
                (target / str(d)).mkdir()
                for f in range(50):
                    (target / str(d) / str(f)).write_bytes(b"x")
        (workdir / "m").rmdir()
        commit, remove = _race([functools.partial(c.commit, f"{key}-c", key),
                                functools.partial(c.remove, key)])
        assert grpc.StatusCode.INTERNAL not in (commit, remove)
        if commit == grpc.StatusCode.OK:
            assert remove == NOT_FOUND
            assert c.stat(f"{key}-c").kind == snapshots_pb2.COMMITTED
        else:
            assert (commit, remove) == (NOT_FOUND, grpc.StatusCode.OK)
        assert status_of(functools.partial(c.stat, key))[0] == NOT_FOUND
    c.cleanup()
    assert len(_snapshot_dirs(daemon)) == len(c.list())
