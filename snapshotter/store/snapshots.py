"""The snapshot domain: containerd's Snapshotter semantics over sqlite metadata and overlay dirs.

Every method is one metadata transaction. Keys are opaque strings (containerd sends keys like
``default/12/extract-123 sha256:...``): they only ever live in the database, and directories are
named by numeric ids.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from snapshotter.labels import (
    KATA_GUEST_PULL,
    KATA_GUEST_PULL_VALUE,
    REMOTE,
    REMOTE_VALUE,
    SNAPSHOT_REF,
    validate_labels,
)
from snapshotter.model import Counts, Kind, Mount, SnapshotInfo, Usage
from snapshotter.store.diskusage import disk_usage
from snapshotter.store.filters import matcher, parse_filters
from snapshotter.store.guest_pull import GuestPull, chain_volume
from snapshotter.store.layout import Layout
from snapshotter.store.metadata import (
    MetadataStore,
    RemoteLayerRecord,
    SnapshotRecord,
    Transaction,
)
from snapshotter.store.mounts import LowerDir, build_mounts, guest_pull_mount
from snapshotter.store.remote import AttachedLayer, RemoteLayerError, RemoteLayers

log = logging.getLogger(__name__)

Clock = Callable[[], int]


def _info(record: SnapshotRecord) -> SnapshotInfo:
    return SnapshotInfo(
        name=record.key,
        parent=record.parent_key,
        kind=record.kind,
        created_ns=record.created_ns,
        updated_ns=record.updated_ns,
        labels=dict(record.labels),
    )


def _require_key(key: str, what: str = "key") -> None:
    if not key:
        raise InvalidArgumentError(f"snapshot {what} must not be empty")


class Snapshotter:
    """containerd's snapshots: ordinary ones in overlay directories, and committed layers served
    lazily through a ``RemoteLayers`` once the daemon enables it.

    ``guest_pull``: Kata guest image pulling (docs/kata.md). Lazily served layers are marked as
    guest-pullable, and a container's snapshot or view over parents gets one Kata mount.
    """

    def __init__(
        self, root: Path, *, clock: Clock = time.time_ns, guest_pull: GuestPull | None = None
    ) -> None:
        self.layout = Layout(root)
        self.layout.create()
        self.store = MetadataStore(self.layout.database)
        self._clock = clock
        self._remote: RemoteLayers | None = None
        self._guest_pull = guest_pull
        self._lock = threading.Lock()
        self._attaching: set[str] = set()  # layer ids between mount and their row (Cleanup)
        # A lock per target being prepared lazily, with how many Prepares use it.
        self._target_locks: dict[str, tuple[threading.Lock, int]] = {}

    @property
    def guest_pull(self) -> GuestPull | None:
        """Kata guest-pull mode, for the daemon's status."""
        return self._guest_pull

    def enable_remote(self, remote: RemoteLayers | None) -> None:
        """Serve layers lazily from now on; None serves ordinary snapshots only."""
        self._remote = remote

    def close(self) -> None:
        self.store.close()

    # -- creating ----------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        if self._remote is not None and labels.get(SNAPSHOT_REF):
            self._try_remote(self._remote, key, parent, labels)  # raises AlreadyExists if served
        return self._create(Kind.ACTIVE, key, parent, labels)

    def remote_layer_records(self) -> list[RemoteLayerRecord]:
        """Every lazily served layer, to attach again after a restart."""
        with self.store.transaction() as tx:
            return tx.remote_layers()

    def existing(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` name a snapshot, in one transaction."""
        with self.store.transaction() as tx:
            return {key for key in keys if tx.get(key) is not None}

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        _require_key(key)
        checked = validate_labels(labels)
        with self.store.transaction() as tx:
            if tx.get(key) is not None:
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            parent_record = self._committed_parent(tx, parent)
            snapshot_id = tx.insert(
                key, parent_record.id if parent_record else None, kind, self._clock(), checked
            )
            # The directories are made before the transaction commits: a crash now leaves an
            # orphaned directory for Cleanup, never a row without its directory.
            self._make_dirs(snapshot_id, kind)
            mounts = self._mounts(tx, snapshot_id, kind, parent_record, checked)
        log.info("snapshot created kind=%s key=%r parent=%r id=%d", kind.label, key, parent,
                 snapshot_id)
        return mounts

    def _committed_parent(self, tx: Transaction, parent: str) -> SnapshotRecord | None:
        if not parent:
            return None
        record = tx.get(parent)
        if record is None:
            raise NotFoundError(f"parent snapshot {parent!r} does not exist")
        if record.kind is not Kind.COMMITTED:
            raise InvalidArgumentError(
                f"parent snapshot {parent!r} is {record.kind.label}, not committed"
            )
        return record

    def _make_dirs(self, snapshot_id: int, kind: Kind, tree: Path | None = None) -> None:
        """``tree``: where the snapshot's files really are, such as a FUSE layer directory."""
        directory = self.layout.snapshot_dir(snapshot_id)
        if directory.exists():
            # Left by a rolled-back transaction or a crash, whose id is now reused.
            shutil.rmtree(directory)
        directory.mkdir(mode=0o700)
        fs = self.layout.fs_dir(snapshot_id)
        fs.mkdir()
        # containerd's RootPermission: a fresh root is 0755 whatever the umask.
        os.chmod(fs, 0o755)  # noqa: S103
        if kind is Kind.ACTIVE:
            self.layout.work_dir(snapshot_id).mkdir(mode=0o700)
        link = self.layout.link(snapshot_id)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(tree or fs, link.parent))

    def _mounts(
        self, tx: Transaction, snapshot_id: int, kind: Kind, parent: SnapshotRecord | None,
        labels: dict[str, str],
    ) -> list[Mount]:
        chain = tx.ancestors(parent.id) if parent else []
        lowers = [LowerDir(self._tree(r), self.layout.link(r.id)) for r in chain]
        # A snapshot that names a target is a layer being unpacked, not a container's rootfs:
        # containerd applies the diff to its upper directory, so it keeps the plain overlay.
        if self._guest_pull is not None and chain and SNAPSHOT_REF not in labels:
            own = LowerDir(self.layout.fs_dir(snapshot_id), self.layout.link(snapshot_id))
            volume = chain_volume([r.labels for r in chain])
            return [guest_pull_mount(kind, own, self.layout.work_dir(snapshot_id), lowers,
                                     self._guest_pull.mount_type, volume)]
        return build_mounts(
            kind, self.layout.fs_dir(snapshot_id), self.layout.work_dir(snapshot_id), lowers
        )

    def _tree(self, record: SnapshotRecord) -> Path:
        if record.remote_layer is not None:
            return self.layout.remote_dir(record.remote_layer)
        return self.layout.fs_dir(record.id)

    # -- remote (lazily served) layers -------------------------------------------------------

    def _try_remote(
        self, remote: RemoteLayers, key: str, parent: str, labels: Mapping[str, str]
    ) -> None:
        """Serve the layer lazily and raise AlreadyExistsError, or return for the normal path.

        Prepares of one target are serialised: containerd may unpack the same layer for two
        images at once, and only the first may attach it."""
        target = labels[SNAPSHOT_REF]
        checked = validate_labels(labels)
        with self._target_lock(target):
            with self.store.transaction() as tx:
                parent_record = tx.get(parent) if parent else None
                if parent and (parent_record is None
                               or parent_record.kind is not Kind.COMMITTED):
                    return  # let the normal path report the bad parent
                existing = tx.get(target)
                if existing is not None and existing.parent_key == parent:
                    raise AlreadyExistsError(f"target snapshot {target!r} already exists")
            layer_id = "r" + secrets.token_hex(6)
            with self._lock:
                self._attaching.add(layer_id)
            try:
                try:
                    attached = remote.mount(checked, layer_id)
                except RemoteLayerError as exc:
                    self._fallback(key, str(exc))
                    return
                name = self._record_remote(remote, target, parent, checked, attached)
            finally:
                with self._lock:
                    self._attaching.discard(layer_id)
        log.info("remote-snapshot-prepared=true key=%r name=%r layer=%s format=%s", key, name,
                 layer_id, attached.format)
        raise AlreadyExistsError(f"target snapshot {target!r} already exists")

    @contextmanager
    def _target_lock(self, target: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._target_locks.get(target, (threading.Lock(), 0))
            self._target_locks[target] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._target_locks[target]
                if users == 1:
                    del self._target_locks[target]
                else:
                    self._target_locks[target] = (lock, users - 1)

    def _record_remote(
        self,
        remote: RemoteLayers,
        target: str,
        parent: str,
        labels: dict[str, str],
        attached: AttachedLayer,
    ) -> str:
        try:
            with self.store.transaction() as tx:
                parent_record = tx.get(parent) if parent else None
                # Another namespace may hold this chain ID over a different parent key.
                taken = tx.get(target) is not None
                name = f"{target}@{attached.layer_id}" if taken else target
                snapshot_id = tx.insert(
                    name, parent_record.id if parent_record else None, Kind.COMMITTED,
                    self._clock(), {**labels, REMOTE: REMOTE_VALUE, **self._guest_pull_mark()},
                )
                self._make_dirs(snapshot_id, Kind.COMMITTED,
                                self.layout.remote_dir(attached.layer_id))
                tx.insert_remote(RemoteLayerRecord(
                    snapshot_id, attached.layer_id, attached.slot, attached.image_ref,
                    attached.layer_digest, attached.blob_size, attached.toc_digest,
                    attached.annotations,
                ))
        except BaseException:
            remote.unmount(attached.layer_id)
            raise
        return name

    def _guest_pull_mark(self) -> dict[str, str]:
        return {KATA_GUEST_PULL: KATA_GUEST_PULL_VALUE} if self._guest_pull is not None else {}

    @staticmethod
    def _fallback(key: str, reason: str) -> None:
        log.info("remote-snapshot-prepared=false key=%r reason=%r", key, reason)

    # -- reading -----------------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        _require_key(key)
        with self.store.transaction() as tx:
            record = self._get(tx, key)
            if record.kind is Kind.COMMITTED:
                raise FailedPreconditionError(
                    f"snapshot {key!r} is committed: only active and view snapshots have mounts"
                )
            parent = tx.get_by_id(record.parent_id) if record.parent_id else None
            return self._mounts(tx, record.id, record.kind, parent, dict(record.labels))

    def stat(self, key: str) -> SnapshotInfo:
        _require_key(key)
        with self.store.transaction() as tx:
            return _info(self._get(tx, key))

    def list(self, filters: Sequence[str] = ()) -> list[SnapshotInfo]:
        matches = matcher(parse_filters(filters))
        with self.store.transaction() as tx:
            records = tx.all()
        return [info for info in map(_info, records) if matches(info)]

    def usage(self, key: str) -> Usage:
        _require_key(key)
        with self.store.transaction() as tx:
            record = self._get(tx, key)
        if record.remote_layer is not None:
            # What the lazy layer occupies on this node: its chunks in the cache so far.
            cached = self._remote.cached_bytes(record.remote_layer) if self._remote else 0
            return Usage(cached, 0)
        if record.size is not None and record.inodes is not None:
            return Usage(record.size, record.inodes)
        return disk_usage(self.layout.fs_dir(record.id))

    def counts(self) -> Counts:
        with self.store.transaction() as tx:
            return tx.counts()

    @staticmethod
    def _get(tx: Transaction, key: str) -> SnapshotRecord:
        record = tx.get(key)
        if record is None:
            raise NotFoundError(f"snapshot {key!r} does not exist")
        return record

    # -- changing ----------------------------------------------------------------------------

    def commit(
        self, name: str, key: str, labels: Mapping[str, str], parent: str = ""
    ) -> None:
        _require_key(name, "name")
        _require_key(key)
        checked = validate_labels(labels)
        with self.store.transaction() as tx:
            record = self._committable(tx, key)
        # Measured outside the transaction: du of a large layer must not stall other RPCs.
        usage = disk_usage(self.layout.fs_dir(record.id))
        with self.store.transaction() as tx:
            current = self._committable(tx, key)
            if current.id != record.id:
                raise NotFoundError(f"snapshot {key!r} changed while being committed")
            if tx.get(name) is not None:
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            parent_id = current.parent_id
            if parent:
                if current.parent_key and parent != current.parent_key:
                    raise InvalidArgumentError(
                        f"commit parent {parent!r} differs from the snapshot's parent "
                        f"{current.parent_key!r}"
                    )
                parent_record = self._committed_parent(tx, parent)
                assert parent_record is not None
                parent_id = parent_record.id
            tx.commit_snapshot(
                current.id, name, parent_id, self._clock(), checked, usage.size, usage.inodes
            )
        shutil.rmtree(self.layout.work_dir(record.id), ignore_errors=True)
        log.info("snapshot committed name=%r key=%r id=%d size=%d", name, key, record.id,
                 usage.size)

    def _committable(self, tx: Transaction, key: str) -> SnapshotRecord:
        record = self._get(tx, key)
        if record.kind is Kind.VIEW:
            raise FailedPreconditionError(f"snapshot {key!r} is a view: views cannot be committed")
        if record.kind is not Kind.ACTIVE:
            raise FailedPreconditionError(f"snapshot {key!r} is not active")
        return record

    def remove(self, key: str) -> None:
        _require_key(key)
        with self.store.transaction() as tx:
            record = self._get(tx, key)
            if tx.has_children(record.id):
                raise FailedPreconditionError(
                    f"cannot remove snapshot {key!r}: it has children (remove them first)"
                )
            tx.delete(record.id)
        # The directory goes only after the deletion has committed: a crash before that must
        # leave the row with its directory. Ids are never reused (AUTOINCREMENT), so no later
        # snapshot can meet this directory; if we die now, Cleanup removes the orphan.
        self._empty_trash(self._trash(record.id))
        if record.remote_layer is not None and self._remote is not None:
            self._remote.unmount(record.remote_layer)
        log.info("snapshot removed key=%r id=%d", key, record.id)

    def update(self, info: SnapshotInfo, fieldpaths: Sequence[str]) -> SnapshotInfo:
        _require_key(info.name, "name")
        with self.store.transaction() as tx:
            record = self._get(tx, info.name)
            labels = dict(record.labels)
            if not fieldpaths:
                labels = dict(info.labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    label = path[len("labels."):]
                    if label in info.labels:
                        labels[label] = info.labels[label]
                    else:
                        labels.pop(label, None)
                elif path == "labels":
                    labels = dict(info.labels)
                else:
                    raise InvalidArgumentError(
                        f"cannot update {path!r} field on snapshot {info.name!r}"
                    )
            tx.set_labels(record.id, validate_labels(labels), self._clock())
            updated = tx.get_by_id(record.id)
            assert updated is not None
            return _info(updated)

    def cleanup(self) -> int:
        """Remove directories, links and saved TOC tails that no snapshot owns (left by a crash
        between the filesystem step and the transaction), and cached chunks no remote layer
        references; return how many paths were removed. Chunks are logged, not counted."""
        trashed: list[Path] = []
        with self.store.transaction() as tx:
            ids = tx.ids()
            recorded = {record.layer_id: record.layer_digest for record in tx.remote_layers()}
            layer_ids = set(recorded)
            with self._lock:
                attaching = set(self._attaching)
            layer_ids |= attaching
            for entry in list(self.layout.snapshots.iterdir()):
                if not (entry.name.isdigit() and int(entry.name) in ids):
                    trashed.append(self._trash_path(entry))
            # Links are named by id, so ownership is by name (a remote layer's link may dangle
            # while its layer is detached, and must survive that).
            owned_links = {self.layout.link(i).name for i in ids}
            for link in list(self.layout.links.iterdir()):
                if link.name not in owned_links:
                    # Moved aside under the lock, like the directories: once it is released, a
                    # Prepare may reuse a crashed transaction's id and make this very link anew.
                    trashed.append(self._trash_path(link))
            for tail in list(self.layout.tails.iterdir()):
                if self.layout.tail_owner(tail) not in layer_ids:
                    trashed.append(tail)
        trashed += list(self.layout.trash.iterdir())
        for path in trashed:
            self._empty_trash(path)
        if trashed:
            log.info("cleanup removed=%d", len(trashed))
        if self._remote is not None:
            # Outside the transaction: the chunk walk must not hold the database. A layer
            # recorded since is attached, so its own chunks protect it; one removed since is
            # still in ``recorded`` and judged conservatively.
            self._remote.collect_garbage(recorded, attaching)
        return len(trashed)

    def _trash(self, snapshot_id: int) -> Path:
        self.layout.link(snapshot_id).unlink(missing_ok=True)
        return self._trash_path(self.layout.snapshot_dir(snapshot_id))

    def _trash_path(self, path: Path) -> Path:
        """Move ``path`` into the trash; a path a concurrent Cleanup removed already is fine."""
        target = self.layout.trash / f"{path.name}-{time.monotonic_ns()}"
        try:
            path.rename(target)
        except FileNotFoundError:
            return path
        return target

    @staticmethod
    def _empty_trash(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
