"""Domain errors of the snapshotter; the gRPC edge maps each class to exactly one status code."""

from __future__ import annotations


class SnapshotterError(Exception):
    """Base class: every error the snapshot domain raises on purpose."""


class NotFoundError(SnapshotterError):
    pass


class AlreadyExistsError(SnapshotterError):
    pass


class FailedPreconditionError(SnapshotterError):
    pass


class InvalidArgumentError(SnapshotterError):
    pass


class NotImplementedByBackendError(SnapshotterError):
    pass
