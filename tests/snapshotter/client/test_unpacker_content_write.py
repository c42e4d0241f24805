"""ContainerdClient's gRPC edge against in-process fakes of containerd's content and leases
services on a unix socket: the Write stream, its error paths, and the metadata headers."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from snapshotter._proto import content_pb2, content_pb2_grpc, leases_pb2, leases_pb2_grpc
from snapshotter.client.containerd_api import ContainerdError, ContainerdUnavailableError
from snapshotter.client.containerd_client import WRITE_CHUNK, ContainerdClient
from snapshotter.errors import (
    FailedPreconditionError,
    NotFoundError,
    NotImplementedByBackendError,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeContent(content_pb2_grpc.ContentServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.aborted: list[str] = []
        self.metadata: list[dict[str, str]] = []

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})

    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._seen(context)
        if request.digest not in self.blobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: not found")
        info = content_pb2.Info(digest=request.digest, size=len(self.blobs[request.digest]))
        return content_pb2.InfoResponse(info=info)

    def Write(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        self._seen(context)
        data = b""
        for request in requests:
            if request.expected in self.blobs:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{request.expected}: exists")
            if request.offset != len(data):
                context.abort(grpc.StatusCode.OUT_OF_RANGE, "bad offset")
            data += request.data
            if request.action == content_pb2.COMMIT:
                if sha256(data) != request.expected or len(data) != request.total:
                    context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"unexpected commit digest {sha256(data)}, expected {request.expected}",
                    )
                self.blobs[request.expected] = data
                self.labels[request.expected] = dict(request.labels)
                yield content_pb2.WriteContentResponse(
                    action=content_pb2.COMMIT, offset=len(data), digest=request.expected
                )
                return
            yield content_pb2.WriteContentResponse(action=content_pb2.WRITE, offset=len(data))

    def Abort(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.aborted.append(request.ref)
        return empty_pb2.Empty()


class FakeLeases(leases_pb2_grpc.LeasesServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.live: set[str] = set()
        self.labels: dict[str, dict[str, str]] = {}

    def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.live.add(request.id)
        self.labels[request.id] = dict(request.labels)
        return leases_pb2.CreateResponse(lease=leases_pb2.Lease(id=request.id))

    def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.live.discard(request.id)
        return empty_pb2.Empty()


@pytest.fixture
def fake() -> Iterator[tuple[ContainerdClient, FakeContent, FakeLeases]]:
    content, leases = FakeContent(), FakeLeases()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    content_pb2_grpc.add_ContentServicer_to_server(content, server)
    leases_pb2_grpc.add_LeasesServicer_to_server(leases, server)
    with tempfile.TemporaryDirectory(prefix="lzct", dir="/tmp") as tmp:
        socket = Path(tmp) / "c.sock"
        server.add_insecure_port(f"unix:{socket}")
        server.start()
        try:
            with ContainerdClient(socket, "ns1") as client:
                yield client, content, leases
        finally:
            server.stop(grace=None).wait(5)


def test_write_streams_in_message_sized_pieces_with_progress(
    fake: tuple[ContainerdClient, FakeContent, FakeLeases],
) -> None:
    client, content, leases = fake
    data = bytes(range(256)) * (WRITE_CHUNK // 256 * 2 + 100)  # a bit over two messages
    seen: list[int] = []
    with client.lease() as lease_id:
        written = client.write_content(
            "ref-1", [data[:10], data[10:]], expected=sha256(data), total=len(data),
            labels={"a": "b"}, on_progress=seen.append,
        )
    assert written and content.blobs[sha256(data)] == data
    assert content.labels[sha256(data)] == {"a": "b"}
    assert sum(seen) == len(data) and max(seen) <= WRITE_CHUNK
    assert content.metadata[-1]["containerd-namespace"] == "ns1"
    assert content.metadata[-1]["containerd-lease"] == lease_id
    assert leases.live == set() and "containerd.io/gc.expire" in leases.labels[lease_id]


def test_write_of_present_content_reports_false(
    fake: tuple[ContainerdClient, FakeContent, FakeLeases],
) -> None:
    client, content, _leases = fake
    content.blobs[sha256(b"x")] = b"x"
    assert client.write_content("ref", [b"x"], expected=sha256(b"x"), total=1) is False
    assert "containerd-lease" not in content.metadata[-1]


def test_a_failing_source_keeps_its_exception_and_aborts_the_ingest(
    fake: tuple[ContainerdClient, FakeContent, FakeLeases],
) -> None:
    client, content, _leases = fake

    def chunks() -> Iterator[bytes]:
        yield b"first part"
        raise OSError("registry went away")

    with pytest.raises(OSError, match="registry went away"):
        client.write_content("ref-2", chunks(), expected=sha256(b"whatever"), total=8)
    assert content.aborted == ["ref-2"] and content.blobs == {}


def test_digest_mismatch_is_refused_by_containerd(
    fake: tuple[ContainerdClient, FakeContent, FakeLeases],
) -> None:
    client, content, _leases = fake
    with pytest.raises(FailedPreconditionError, match="unexpected commit digest"):
        client.write_content("ref-3", [b"actual"], expected=sha256(b"claimed"), total=6)
    assert content.aborted == ["ref-3"]


def test_errors_map_to_domain_errors(
    fake: tuple[ContainerdClient, FakeContent, FakeLeases],
) -> None:
    client, _content, _leases = fake
    with pytest.raises(NotFoundError, match="not found"):
        client.content_info(sha256(b"missing"))
    with pytest.raises(NotImplementedByBackendError):  # the fake has no images service
        client.get_image("x")
    assert issubclass(ContainerdUnavailableError, ContainerdError)


def test_a_lease_is_deleted_when_the_block_fails(
    fake: tuple[ContainerdClient, FakeContent, FakeLeases],
) -> None:
    client, _content, leases = fake
    with pytest.raises(RuntimeError), client.lease():
        assert len(leases.live) == 1
        raise RuntimeError("boom")
    assert leases.live == set()


def test_missing_socket_is_reported_before_any_call(tmp_path: Path) -> None:
    with ContainerdClient(tmp_path / "none.sock") as client, pytest.raises(
        ContainerdUnavailableError, match="does not exist"
    ):
        client.version()
