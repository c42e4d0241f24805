"""Snapshot metadata in sqlite: one transaction per operation, WAL, durable commits.

The database is the single source of truth. Directories on disk are created inside the
operation's transaction before it commits, and deleted only after a removal has committed, so a
crash at any point leaves at worst an orphaned directory for Cleanup to remove, never a snapshot
row without its directory.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.model import Counts, Kind

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER,
    inodes INTEGER
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS remote_layers (
    snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    layer_id TEXT NOT NULL UNIQUE,
    slot INTEGER NOT NULL UNIQUE,
    image_ref TEXT NOT NULL,
    layer_digest TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    toc_digest TEXT,
    annotations TEXT NOT NULL
);
"""

_SELECT = """
SELECT s.id, s.key, s.parent_id, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns,
       s.labels, s.size, s.inodes, r.layer_id
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
LEFT JOIN remote_layers r ON r.snapshot_id = s.id
"""


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    id: int
    key: str
    parent_id: int | None
    parent_key: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str]
    size: int | None
    inodes: int | None
    remote_layer: str | None = None  # the FUSE layer id of a lazily served (remote) snapshot


@dataclass(frozen=True, slots=True)
class RemoteLayerRecord:
    """Everything needed to re-attach a remote layer after a restart, without the network."""

    snapshot_id: int
    layer_id: str
    slot: int
    image_ref: str
    layer_digest: str
    blob_size: int
    toc_digest: str | None
    annotations: dict[str, str]


def _record(row: tuple[object, ...]) -> SnapshotRecord:
    (id_, key, parent_id, parent_key, kind, created, updated, labels, size, inodes, remote) = row
    assert isinstance(id_, int) and isinstance(key, str) and isinstance(labels, str)
    assert isinstance(kind, int) and isinstance(created, int) and isinstance(updated, int)
    return SnapshotRecord(
        id=id_,
        key=key,
        parent_id=parent_id if isinstance(parent_id, int) else None,
        parent_key=str(parent_key),
        kind=Kind(kind),
        created_ns=created,
        updated_ns=updated,
        labels=json.loads(labels),
        size=size if isinstance(size, int) else None,
        inodes=inodes if isinstance(inodes, int) else None,
        remote_layer=remote if isinstance(remote, str) else None,
    )


class MetadataError(Exception):
    """The database cannot be opened or has an unknown schema."""


class Transaction:
    """Queries available inside one sqlite transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def get(self, key: str) -> SnapshotRecord | None:
        row = self._conn.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def get_by_id(self, snapshot_id: int) -> SnapshotRecord | None:
        row = self._conn.execute(_SELECT + " WHERE s.id = ?", (snapshot_id,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[SnapshotRecord]:
        return [_record(r) for r in self._conn.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self._conn.execute("SELECT id FROM snapshots")}

    def ancestors(self, snapshot_id: int) -> list[SnapshotRecord]:
        """The snapshot and its parents, nearest first."""
        chain: list[SnapshotRecord] = []
        current: int | None = snapshot_id
        while current is not None:
            record = self.get_by_id(current)
            if record is None:
                break
            chain.append(record)
            current = record.parent_id
        return chain

    def has_children(self, snapshot_id: int) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)
        ).fetchone()
        return row is not None

    def insert(
        self, key: str, parent_id: int | None, kind: Kind, now_ns: int, labels: dict[str, str]
    ) -> int:
        cursor = self._conn.execute(
            "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), now_ns, now_ns, json.dumps(labels, sort_keys=True)),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def commit_snapshot(
        self,
        snapshot_id: int,
        name: str,
        parent_id: int | None,
        now_ns: int,
        labels: dict[str, str],
        size: int,
        inodes: int,
    ) -> None:
        self._conn.execute(
            "UPDATE snapshots SET key = ?, parent_id = ?, kind = ?, created_ns = ?,"
            " updated_ns = ?, labels = ?, size = ?, inodes = ? WHERE id = ?",
            (
                name, parent_id, int(Kind.COMMITTED), now_ns, now_ns,
                json.dumps(labels, sort_keys=True), size, inodes, snapshot_id,
            ),
        )

    def insert_remote(self, record: RemoteLayerRecord) -> None:
        self._conn.execute(
            "INSERT INTO remote_layers (snapshot_id, layer_id, slot, image_ref, layer_digest,"
            " blob_size, toc_digest, annotations) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.snapshot_id, record.layer_id, record.slot, record.image_ref,
                record.layer_digest, record.blob_size, record.toc_digest,
                json.dumps(record.annotations, sort_keys=True),
            ),
        )

    def remote_layers(self) -> list[RemoteLayerRecord]:
        rows = self._conn.execute(
            "SELECT snapshot_id, layer_id, slot, image_ref, layer_digest, blob_size, toc_digest,"
            " annotations FROM remote_layers ORDER BY snapshot_id"
        ).fetchall()
        return [
            RemoteLayerRecord(int(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]), int(r[5]),
                              None if r[6] is None else str(r[6]), json.loads(r[7]))
            for r in rows
        ]

    def used_slots(self) -> set[int]:
        return {int(r[0]) for r in self._conn.execute("SELECT slot FROM remote_layers")}

    def set_labels(self, snapshot_id: int, labels: dict[str, str], now_ns: int) -> None:
        self._conn.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(labels, sort_keys=True), now_ns, snapshot_id),
        )

    def delete(self, snapshot_id: int) -> None:
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def counts(self) -> Counts:
        found = dict(
            self._conn.execute("SELECT kind, COUNT(*) FROM snapshots GROUP BY kind").fetchall()
        )
        return Counts(
            active=found.get(int(Kind.ACTIVE), 0),
            committed=found.get(int(Kind.COMMITTED), 0),
            view=found.get(int(Kind.VIEW), 0),
        )


class MetadataStore:
    """The sqlite database; every public operation is one serialised transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            # Autocommit mode: transactions below are explicit, BEGIN IMMEDIATE ... COMMIT.
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transaction survives power loss, not only a killed process.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            self._check_version()
        except sqlite3.Error as exc:
            raise MetadataError(f"cannot open metadata database {path}: {exc}") from exc

    def _check_version(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is None:
            self._conn.execute(
                "INSERT INTO meta (name, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise MetadataError(
                f"{self.path} has schema version {row[0]}, this lazysnap reads {SCHEMA_VERSION}"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
