"""The gRPC edge toward containerd: content, images, leases, diff and snapshots services.

Every call carries the ``containerd-namespace`` metadata header, and the ``containerd-lease``
header while a lease is open. Protobuf messages never leave this module: callers get the plain
types of ``snapshotter.client.containerd_api`` and its domain errors.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from registry import Descriptor
from snapshotter import errors
from snapshotter import labels as L
from snapshotter._proto import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    mount_pb2,
    snapshots_pb2,
    snapshots_pb2_grpc,
    version_pb2_grpc,
)
from snapshotter.client.containerd_api import (
    ContainerdError,
    ContainerdUnavailableError,
    ContentInfo,
    ImageRecord,
)
from snapshotter.model import Kind, Mount, SnapshotInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONTAINERD_ADDRESS = Path("/run/containerd/containerd.sock")
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
MAX_MESSAGE = 16 * 1024 * 1024  # containerd's own client limit
WRITE_CHUNK = 1024 * 1024
LEASE_EXPIRY = datetime.timedelta(hours=24)  # a crashed pull's lease is collected after this
CALL_TIMEOUT = 60.0
APPLY_TIMEOUT = 3600.0  # unpacking a multi-GiB layer takes a while
WRITE_TIMEOUT = 3600.0

_ERRORS: dict[grpc.StatusCode, type[errors.SnapshotterError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.UNIMPLEMENTED: errors.NotImplementedByBackendError,
    grpc.StatusCode.UNAVAILABLE: ContainerdUnavailableError,
}


def _raise(exc: grpc.RpcError, what: str) -> NoReturn:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    error = _ERRORS.get(code, ContainerdError)
    raise error(f"{what}: {detail or code.name}") from exc


def _pieces(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` cut to at most one gRPC message's worth each."""
    for chunk in chunks:
        for start in range(0, len(chunk), WRITE_CHUNK):
            yield chunk[start : start + WRITE_CHUNK]


class _WriteReplies:
    """Drains a Write stream's replies on a helper thread; keeps the commit digest or error."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.committed = ""
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._drain, name="content-write", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            for reply in self._call:
                if reply.action == content_pb2.COMMIT:
                    self.committed = reply.digest
        except grpc.RpcError as exc:
            self.error = exc

    def send(self, requests: queue.Queue[Any], message: Any) -> bool:
        """Queue ``message``; False once the stream has ended because containerd answered an
        error."""
        while self._thread.is_alive():
            try:
                requests.put(message, timeout=0.2)
            except queue.Full:
                continue
            return True
        return False

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ContainerdError(f"content write did not finish within {timeout:.0f} s")


def _descriptor_to_proto(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations)
    )


def _descriptor_from_proto(d: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(d.media_type, d.digest, d.size, dict(d.annotations))


def _mount_to_proto(m: Mount) -> mount_pb2.Mount:
    return mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))


def _mount_from_proto(m: mount_pb2.Mount) -> Mount:
    return Mount(type=m.type, source=m.source, options=tuple(m.options), target=m.target)


def _ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


class ContainerdClient:
    """A synchronous client of one containerd namespace. Use it as a context manager, because
    it owns the channel."""

    def __init__(
        self, address: Path = DEFAULT_CONTAINERD_ADDRESS, namespace: str = "default"
    ) -> None:
        self.address = Path(address)
        self.namespace = namespace
        self._lease: str | None = None
        self._channel = grpc.insecure_channel(
            f"unix:{self.address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._diff = diff_pb2_grpc.DiffStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._version = version_pb2_grpc.VersionStub(self._channel)

    def __repr__(self) -> str:
        return f"ContainerdClient(address={str(self.address)!r}, namespace={self.namespace!r})"

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [(NAMESPACE_HEADER, self.namespace)]
        if self._lease is not None:
            metadata.append((LEASE_HEADER, self._lease))
        return metadata

    def _call(self, what: str, rpc: Callable[..., T], request: Any, timeout: float) -> T:
        try:
            return rpc(request, metadata=self._metadata(), timeout=timeout)
        except grpc.RpcError as exc:
            _raise(exc, what)

    def version(self) -> str:
        """containerd's version; also the cheapest check that it answers."""
        if not self.address.exists():
            raise ContainerdUnavailableError(
                f"containerd socket {self.address} does not exist (is containerd running? "
                "--address selects another socket)"
            )
        try:
            reply = self._version.Version(
                empty_pb2.Empty(), metadata=self._metadata(), timeout=10.0
            )
        except grpc.RpcError as exc:
            _raise(exc, f"containerd at {self.address} does not answer")
        return str(reply.version)

    # -- leases -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        if self._lease is not None:
            raise ContainerdError("a lease is already open on this client")
        lease_id = f"lazysnap-{time.time_ns()}-{secrets.token_hex(4)}"
        expires = datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY
        request = leases_pb2.CreateRequest(
            id=lease_id, labels={L.GC_EXPIRE: expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
        self._call("create lease", self._leases.Create, request, CALL_TIMEOUT)
        log.debug("containerd lease-created id=%s", lease_id)
        self._lease = lease_id
        try:
            yield lease_id
        except BaseException:
            self._lease = None
            # Keep the original error; a lease we cannot delete expires by its gc.expire label.
            with contextlib.suppress(errors.SnapshotterError):
                self._delete_lease(lease_id)
            raise
        self._lease = None
        self._delete_lease(lease_id)

    def _delete_lease(self, lease_id: str) -> None:
        # Unreferenced content and snapshots become collectable once the lease is gone.
        self._call(
            "delete lease", self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id),
            CALL_TIMEOUT,
        )
        log.debug("containerd lease-deleted id=%s", lease_id)

    # -- content ----------------------------------------------------------------------------

    def content_info(self, digest: str) -> ContentInfo:
        reply = self._call(
            f"content {digest}", self._content.Info, content_pb2.InfoRequest(digest=digest),
            CALL_TIMEOUT,
        )
        return ContentInfo(reply.info.digest, reply.info.size, dict(reply.info.labels))

    def read_content(self, digest: str, *, max_size: int) -> bytes:
        info = self.content_info(digest)
        if info.size > max_size:
            raise ContainerdError(f"content {digest} is {info.size} bytes, more than {max_size}")
        parts: list[bytes] = []
        try:
            stream = self._content.Read(
                content_pb2.ReadContentRequest(digest=digest),
                metadata=self._metadata(),
                timeout=CALL_TIMEOUT,
            )
            for reply in stream:
                parts.append(reply.data)
        except grpc.RpcError as exc:
            _raise(exc, f"read content {digest}")
        data = b"".join(parts)
        if len(data) != info.size:
            raise ContainerdError(f"read content {digest}: got {len(data)} of {info.size} bytes")
        return data

    def stream_content(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in the pieces containerd sends, for blobs too large to hold whole.
        The caller checks the digest: this only moves bytes."""
        try:
            stream = self._content.Read(
                content_pb2.ReadContentRequest(digest=digest),
                metadata=self._metadata(),
                timeout=WRITE_TIMEOUT,
            )
            for reply in stream:
                yield reply.data
        except grpc.RpcError as exc:
            _raise(exc, f"read content {digest}")

    def write_content(
        self,
        ref: str,
        chunks: Iterable[bytes],
        *,
        expected: str,
        total: int,
        labels: Mapping[str, str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> bool:
        # grpc consumes a request iterator on a thread of its own and swallows its exceptions,
        # so ``chunks``, which may read from the network, is consumed here in the caller's
        # thread and handed over through a queue. A helper thread drains the replies so that
        # HTTP/2 flow control never stalls containerd.
        requests: queue.Queue[content_pb2.WriteContentRequest | None] = queue.Queue(maxsize=8)
        call = self._content.Write(
            iter(requests.get, None), metadata=self._metadata(), timeout=WRITE_TIMEOUT
        )
        replies = _WriteReplies(call)
        try:
            offset = 0
            for piece in _pieces(chunks):
                message = content_pb2.WriteContentRequest(
                    action=content_pb2.WRITE, ref=ref, offset=offset, data=piece,
                    total=total, expected=expected,
                )
                if not replies.send(requests, message):
                    break  # containerd ended the stream: its error is in ``replies``
                offset += len(piece)
                if on_progress is not None:
                    on_progress(len(piece))
            else:
                commit = content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, ref=ref, offset=offset, total=total,
                    expected=expected, labels=dict(labels or {}),
                )
                replies.send(requests, commit)
            replies.send(requests, None)  # end of the request stream
            replies.wait(WRITE_TIMEOUT)
        except BaseException:
            call.cancel()
            replies.wait(CALL_TIMEOUT)
            self._abort_write(ref)
            raise
        if replies.error is not None:
            error = replies.error
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.ALREADY_EXISTS:
                return False
            self._abort_write(ref)
            _raise(error, f"write content {expected}")
        if replies.committed != expected:
            raise ContainerdError(
                f"write content: containerd committed {replies.committed or 'nothing'}, "
                f"not {expected}"
            )
        return True

    def _abort_write(self, ref: str) -> None:
        """Drop a half-written ingest so a retry starts clean; missing is fine."""
        try:
            self._content.Abort(
                content_pb2.AbortRequest(ref=ref), metadata=self._metadata(), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("containerd abort-write-failed ref=%s error=%s", ref, exc.details())

    def set_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        request = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        self._call(f"label content {digest}", self._content.Update, request, CALL_TIMEOUT)

    # -- images -----------------------------------------------------------------------------

    def get_image(self, name: str) -> ImageRecord:
        reply = self._call(
            f"image {name}", self._images.Get, images_pb2.GetImageRequest(name=name),
            CALL_TIMEOUT,
        )
        image = reply.image
        return ImageRecord(image.name, _descriptor_from_proto(image.target), dict(image.labels))

    def put_image(self, image: ImageRecord) -> None:
        message = images_pb2.Image(
            name=image.name, labels=dict(image.labels), target=_descriptor_to_proto(image.target)
        )
        try:
            self._call(
                f"create image {image.name}", self._images.Create,
                images_pb2.CreateImageRequest(image=message), CALL_TIMEOUT,
            )
        except errors.AlreadyExistsError:
            # As `ctr image pull` does: the name now points at what we pulled.
            mask = field_mask_pb2.FieldMask(paths=["target"])
            self._call(
                f"update image {image.name}", self._images.Update,
                images_pb2.UpdateImageRequest(image=message, update_mask=mask), CALL_TIMEOUT,
            )

    # -- snapshots --------------------------------------------------------------------------

    def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo:
        reply = self._call(
            f"stat snapshot {key!r} in {snapshotter}", self._snapshots.Stat,
            snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key), CALL_TIMEOUT,
        )
        info = reply.info
        return SnapshotInfo(
            info.name, info.parent, Kind(info.kind) if info.kind else Kind.COMMITTED,
            _ns(info.created_at), _ns(info.updated_at), dict(info.labels),
        )

    def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        reply = self._call(
            f"prepare snapshot {key!r} in {snapshotter}", self._snapshots.Prepare, request,
            CALL_TIMEOUT,
        )
        return [_mount_from_proto(m) for m in reply.mounts]

    def commit_snapshot(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]
    ) -> None:
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels)
        )
        self._call(
            f"commit snapshot {name!r} in {snapshotter}", self._snapshots.Commit, request,
            CALL_TIMEOUT,
        )

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(
            f"remove snapshot {key!r} in {snapshotter}", self._snapshots.Remove, request,
            CALL_TIMEOUT,
        )

    # -- diff -------------------------------------------------------------------------------

    def apply_diff(self, layer: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        request = diff_pb2.ApplyRequest(
            diff=_descriptor_to_proto(layer), mounts=[_mount_to_proto(m) for m in mounts]
        )
        reply = self._call(f"apply layer {layer.digest}", self._diff.Apply, request, APPLY_TIMEOUT)
        return _descriptor_from_proto(reply.applied)
