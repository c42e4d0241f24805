"""Plain domain types of the snapshotter. No protobuf here: the gRPC edge converts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.IntEnum):
    # Values match containerd's proto enum so that storage and wire agree without a table.
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: Kind
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    size: int
    inodes: int


@dataclass(frozen=True, slots=True)
class Counts:
    active: int
    committed: int
    view: int
