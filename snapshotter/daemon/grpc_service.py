"""The gRPC edge: containerd's Snapshots service and lazysnap's Daemon service.

Protobuf messages stop here: requests become domain calls, domain errors become status codes
through one table, and nothing but a status with a message ever reaches containerd.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from fusefs import FileRead, Recording, TraceHub
from registry import Credentials, Reference, parse_reference
from snapshotter import errors
from snapshotter._proto import (
    daemon_pb2,
    daemon_pb2_grpc,
    mount_pb2,
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from snapshotter.daemon.index_publish import IndexPublisher, PublishJob
from snapshotter.daemon.pushed_credentials import HOST_WIDE, MAX_TTL_SECONDS, PushedCredentials
from snapshotter.daemon.trace_stream import Started, Timed, TooManyRecordings, stream_trace
from snapshotter.daemon_api import (
    RESOLVE_FAILURE_KEY,
    RegistryAuthError,
    RegistryDeniedError,
    ResolveAnswer,
    ResolveError,
    ResolveTimeoutError,
)
from snapshotter.model import Kind, Mount, SnapshotInfo
from snapshotter.remote.bridge import TrioBridge
from snapshotter.remote.prepare_ahead import read_ahead_announced, resolve_and_read_ahead
from snapshotter.store.snapshots import Snapshotter
from snapshotter.version import VERSION

log = logging.getLogger(__name__)

# containerd relies on these exact codes: its unpacker reads ALREADY_EXISTS from a Prepare as
# "this layer is there already" and checks with a Stat, where NOT_FOUND means it is not.
STATUS_OF_ERROR: tuple[tuple[type[errors.SnapshotterError], grpc.StatusCode], ...] = (
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotImplementedByBackendError, grpc.StatusCode.UNIMPLEMENTED),
    # Daemon/Resolve's registry failures; ImageNotFoundError is a NotFoundError, mapped above.
    # They also carry their kind as trailing metadata for the CLI to read; _call adds it.
    (RegistryAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (RegistryDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ResolveTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ResolveError, grpc.StatusCode.UNAVAILABLE),
)

# List results go out in blocks of at most 100 snapshots, as containerd's own service sends them,
# and at most LIST_BLOCK_BYTES: with large labels 100 snapshots can outgrow containerd's 16 MiB
# message limit, and a client left at gRPC's default accepts only 4 MiB.
LIST_BLOCK = 100
LIST_BLOCK_BYTES = 4 * 1024 * 1024
# A repeated field adds a tag byte and a length varint to each element.
_ELEMENT_OVERHEAD = 6

T = TypeVar("T")


def status_for(exc: errors.SnapshotterError) -> grpc.StatusCode:
    for cls, code in STATUS_OF_ERROR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")


def _call(context: grpc.ServicerContext, rpc: str, action: Callable[[], T]) -> T:
    try:
        return action()
    except errors.SnapshotterError as exc:
        code = status_for(exc)
        log.info("rpc=%s code=%s error=%r", rpc, code.name, str(exc))
        if isinstance(exc, ResolveError):
            context.set_trailing_metadata(((RESOLVE_FAILURE_KEY, exc.kind),))
        _abort(context, code, str(exc))
    except Exception as exc:
        # A bug or an OS error: containerd gets INTERNAL with a message, the daemon lives on.
        log.exception("rpc=%s failed unexpectedly", rpc)
        _abort(context, grpc.StatusCode.INTERNAL, f"{rpc}: {type(exc).__name__}: {exc}")


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_proto(info: SnapshotInfo) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


def info_from_proto(info: snapshots_pb2.Info) -> SnapshotInfo:
    kind = Kind(info.kind) if info.kind in (1, 2, 3) else Kind.COMMITTED
    return SnapshotInfo(
        name=info.name,
        parent=info.parent,
        kind=kind,
        created_ns=info.created_at.seconds * 1_000_000_000 + info.created_at.nanos,
        updated_ns=info.updated_at.seconds * 1_000_000_000 + info.updated_at.nanos,
        labels=dict(info.labels),
    )


def list_blocks(
    infos: Iterable[snapshots_pb2.Info],
    max_count: int = LIST_BLOCK,
    max_bytes: int = LIST_BLOCK_BYTES,
) -> Iterator[list[snapshots_pb2.Info]]:
    """Group infos into blocks of at most ``max_count`` and, unless one alone is larger,
    ``max_bytes`` encoded."""
    block: list[snapshots_pb2.Info] = []
    size = 0
    for info in infos:
        info_size = info.ByteSize() + _ELEMENT_OVERHEAD
        if block and (len(block) == max_count or size + info_size > max_bytes):
            yield block
            block, size = [], 0
        block.append(info)
        size += info_size
    if block:
        yield block


def mounts_to_proto(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self._sn = snapshotter

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = _call(context, "Prepare", lambda: self._sn.prepare(
            request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=mounts_to_proto(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = _call(context, "View", lambda: self._sn.view(
            request.key, request.parent, dict(request.labels)))
        return snapshots_pb2.ViewSnapshotResponse(mounts=mounts_to_proto(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = _call(context, "Mounts", lambda: self._sn.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=mounts_to_proto(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, "Commit", lambda: self._sn.commit(
            request.name, request.key, dict(request.labels), request.parent))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, "Remove", lambda: self._sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = _call(context, "Stat", lambda: self._sn.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=info_to_proto(info))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = _call(context, "Update", lambda: self._sn.update(
            info_from_proto(request.info), paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_proto(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        infos = _call(context, "List", lambda: self._sn.list(list(request.filters)))
        for block in list_blocks(info_to_proto(i) for i in infos):
            yield snapshots_pb2.ListSnapshotsResponse(info=block)

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        usage = _call(context, "Usage", lambda: self._sn.usage(request.key))
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        _call(context, "Cleanup", self._sn.cleanup)
        return empty_pb2.Empty()


@dataclass(frozen=True)
class CredentialsRequest:
    """A valid SetCredentials request: for ``reference``'s repository, or with none for the
    whole ``host``."""

    host: str
    reference: Reference | None
    credentials: Credentials = field(repr=False)
    ttl_seconds: int

    @property
    def repository(self) -> str:
        return self.reference.path if self.reference is not None else HOST_WIDE


def _credentials_from_request(request: Any) -> CredentialsRequest:
    host = request.host.strip()
    reference = None
    if request.image:
        try:
            reference = parse_reference(request.image)
        except ValueError as exc:
            raise errors.InvalidArgumentError(str(exc)) from exc
        host = host or reference.domain
    if not host or len(host) > 255 or any(c.isspace() or c == "/" for c in host):
        raise errors.InvalidArgumentError("host must be a registry host[:port], e.g. example:5000")
    if not request.secret:
        raise errors.InvalidArgumentError("secret (password or identity token) is empty")
    if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
        raise errors.InvalidArgumentError(f"ttl_seconds must be within 0..{MAX_TTL_SECONDS}")
    if request.username:
        credentials = Credentials(username=request.username, password=request.secret)
    else:
        credentials = Credentials(identity_token=request.secret)
    return CredentialsRequest(host, reference, credentials, int(request.ttl_seconds))


def resolved_to_proto(image: ResolveAnswer) -> Any:
    """The manifest travels once: without an index it is the target itself."""
    return daemon_pb2.ResolveResponse(
        name=image.name,
        target_media_type=image.target_media_type,
        target_digest=image.target_digest,
        target_content=image.target_content,
        manifest_media_type=image.manifest_media_type,
        manifest_digest=image.manifest_digest,
        manifest=image.manifest_content if image.has_index else b"",
        config=image.config,
        read_ahead=list(image.read_ahead),
    )


def trace_event_to_proto(timed: Timed) -> daemon_pb2.TraceEvent:
    event = timed.event
    message = daemon_pb2.TraceEvent(seconds=timed.seconds, dropped=timed.dropped)
    if isinstance(event, Started):
        message.started.CopyFrom(
            daemon_pb2.TraceStarted(unix_time=event.unix_time, pid=os.getpid(), version=VERSION)
        )
    elif isinstance(event, FileRead):
        message.read.CopyFrom(daemon_pb2.TraceFileRead(
            layer=event.layer, digest=event.digest, path=event.path, offset=event.offset,
            size=event.size, file_size=event.file_size, wait_seconds=event.wait,
            error=event.error,
        ))
    else:
        message.range.CopyFrom(daemon_pb2.TraceRange(
            digest=event.digest, start=event.start, end=event.end, kind=event.kind,
            duration_seconds=event.duration, error=event.error,
        ))
    return message


class DaemonServicer(daemon_pb2_grpc.DaemonServicer):
    def __init__(
        self,
        snapshotter: Snapshotter,
        credentials: PushedCredentials | None = None,
        remote: TrioBridge | None = None,
        trace: TraceHub | None = None,
        summary: DaemonSummary | None = None,
        publisher: IndexPublisher | None = None,
    ) -> None:
        self._sn = snapshotter
        self._publisher = publisher
        self._credentials = credentials
        self._remote = remote
        self._trace = trace
        self._recordings: list[Recording] = []
        self._summary = summary or DaemonSummary()
        self._started = time.monotonic()

    def Layers(self, request: Any, context: grpc.ServicerContext) -> Any:
        reply = daemon_pb2.LayersResponse(mode=self._summary.mode,
                                          config=dict(self._summary.config))
        if self._remote is None:
            return reply
        report = _call(context, "Layers", self._remote.reports)
        reply.cache_bytes = report.cache_bytes
        reply.cache_capacity_bytes = report.cache_capacity_bytes
        for layer in report.layers:
            reply.layers.add(
                layer_id=layer.layer_id, image=layer.image, digest=layer.digest,
                format=layer.format, size=layer.size, fetched_bytes=layer.fetched_bytes,
                cached_bytes=layer.cached_bytes, on_demand_bytes=layer.on_demand_bytes,
                prefetch_bytes=layer.prefetch_bytes, background_bytes=layer.background_bytes,
                verification=layer.verification,
                chunk_verify_failures=layer.chunk_verify_failures, errors=layer.errors,
                last_error=layer.last_error, registry_bytes=layer.registry_bytes,
            )
        return reply

    def SetCredentials(self, request: Any, context: grpc.ServicerContext) -> Any:
        def store() -> float:
            if self._credentials is None or self._remote is None:
                raise errors.FailedPreconditionError("lazy pulling is disabled in this daemon")
            wanted = _credentials_from_request(request)
            # The registry must accept the new set before it replaces the stored one: a wrong
            # password fails here, and the set that works stays in use.
            candidate = PushedCredentials(None)
            candidate.set(wanted.host, wanted.repository, wanted.credentials, wanted.ttl_seconds)
            self._remote.check_access(candidate, wanted.host, wanted.reference)
            expires = self._credentials.set(
                wanted.host, wanted.repository, wanted.credentials, wanted.ttl_seconds
            )
            # The host, repository and user name only: the secret never reaches a log.
            log.info("registry credentials set host=%s repository=%s user=%r expires_in=%ds",
                     wanted.host, wanted.repository or "*", wanted.credentials.username, expires)
            return expires

        expires = _call(context, "SetCredentials", store)
        return daemon_pb2.SetCredentialsResponse(expires_in_seconds=int(expires))

    def PrepareAhead(self, request: Any, context: grpc.ServicerContext) -> Any:
        layers = [(dict(layer.labels), int(layer.size) or None) for layer in request.layers]

        def start() -> int:
            if self._remote is None:
                return 0
            return sum(read_ahead_announced(self._remote, self._sn.existing, layers))

        started = _call(context, "PrepareAhead", start)
        log.info("prepare-ahead layers=%d started=%d", len(layers), started)
        return daemon_pb2.PrepareAheadResponse(started=started)

    def Resolve(self, request: Any, context: grpc.ServicerContext) -> Any:
        def resolve() -> ResolveAnswer:
            if self._remote is None:
                raise errors.NotImplementedByBackendError("lazy pulling is disabled in this daemon")
            return resolve_and_read_ahead(
                self._remote, self._sn.existing, request.image, request.platform
            )

        image = _call(context, "Resolve", resolve)
        return resolved_to_proto(image)

    def ImagePulled(self, request: Any, context: grpc.ServicerContext) -> Any:
        def queue() -> bool:
            if self._publisher is None:
                return False  # [index] publish is off
            job = PublishJob(request.image, request.manifest_digest, request.namespace)
            return self._publisher.request(job)

        return daemon_pb2.ImagePulledResponse(queued=_call(context, "ImagePulled", queue))

    def Trace(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if self._trace is None:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                   "this daemon serves no lazy layers (lazy pulling is off or FUSE is "
                   "unavailable): there is nothing to trace")
        duration = float(request.duration_seconds)
        if duration < 0:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "duration_seconds is negative")
        log.info("trace recording started duration=%g", duration)
        try:
            for timed in stream_trace(
                self._trace, duration, context.is_active, self._recordings
            ):
                yield trace_event_to_proto(timed)
        except TooManyRecordings as exc:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            log.info("trace recording stopped")

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        counts = _call(context, "Status", self._sn.counts)
        return daemon_pb2.StatusResponse(
            version=VERSION,
            root=str(self._sn.layout.root),
            pid=os.getpid(),
            uptime_seconds=time.monotonic() - self._started,
            snapshots_active=counts.active,
            snapshots_committed=counts.committed,
            snapshots_view=counts.view,
            kata_guest_pull_mount_type=(
                self._sn.guest_pull.mount_type if self._sn.guest_pull else ""
            ),
        )


@dataclass(frozen=True, slots=True)
class DaemonSummary:
    """How the daemon serves layers, for ``lazysnap status --layers``."""

    mode: str = "ordinary"
    config: dict[str, str] = field(default_factory=dict)


def add_services(
    server: grpc.Server,
    snapshotter: Snapshotter,
    credentials: PushedCredentials | None = None,
    remote: TrioBridge | None = None,
    trace: TraceHub | None = None,
    summary: DaemonSummary | None = None,
    publisher: IndexPublisher | None = None,
) -> None:
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    daemon_pb2_grpc.add_DaemonServicer_to_server(
        DaemonServicer(snapshotter, credentials, remote, trace, summary, publisher), server
    )
