"""``client.resolve_send``: the Resolve that ``lazysnap pull`` sends before protobuf is imported."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter import errors
from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.client import daemon_client, resolve_send
from snapshotter.daemon_api import RESOLVE_FAILURE_KEY


@given(image=st.text(max_size=300), platform=st.one_of(st.none(), st.text(max_size=200)))
def test_the_request_is_encoded_as_the_generated_module_encodes_it(
    image: str, platform: str | None
) -> None:
    expected = daemon_pb2.ResolveRequest(image=image, platform=platform or "")
    assert resolve_send.encode_resolve_request(image, platform) == expected.SerializeToString()


def test_the_method_is_the_services_own() -> None:
    service = daemon_pb2.DESCRIPTOR.services_by_name["Daemon"]
    method = service.methods_by_name["Resolve"]
    assert f"/{service.full_name}/{method.name}" == resolve_send.RESOLVE_METHOD
    assert method.input_type.full_name == "lazysnap.daemon.v1.ResolveRequest"


class _Daemon(daemon_pb2_grpc.DaemonServicer):
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.requests: list[daemon_pb2.ResolveRequest] = []

    def Resolve(
        self, request: daemon_pb2.ResolveRequest, context: grpc.ServicerContext
    ) -> daemon_pb2.ResolveResponse:
        self.requests.append(request)
        if self.fail:
            context.set_trailing_metadata(((RESOLVE_FAILURE_KEY, "not-found"),))
            context.abort(grpc.StatusCode.NOT_FOUND, "manifest app:1 (HTTP 404)")
        return daemon_pb2.ResolveResponse(
            name="reg:5000/app:1", target_media_type="m", target_digest="sha256:t",
            target_content=b"{}", manifest_media_type="m", manifest_digest="sha256:t",
            config=b"cfg", read_ahead=["sha256:l"],
        )


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[_Daemon, str]:
    servicer = _Daemon(fail=request.param)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    daemon_pb2_grpc.add_DaemonServicer_to_server(servicer, server)
    address = str(tmp_path / "d.sock")
    server.add_insecure_port(f"unix:{address}")
    server.start()
    yield servicer, address
    server.stop(None)


@pytest.mark.parametrize("daemon", [False], indirect=True)
def test_the_answer_arrives_as_bytes_and_parses_as_before(daemon: tuple[_Daemon, str]) -> None:
    servicer, address = daemon
    with resolve_send.daemon_channel(address) as channel:
        pending = resolve_send.send_resolve(channel, "reg:5000/app:1", "linux/arm64")
        raw = pending.result()
        assert isinstance(raw, bytes)
        answer = daemon_client.resolved_from_proto(daemon_client.parse_resolve_reply(raw, address))
    assert (servicer.requests[0].image, servicer.requests[0].platform) == (
        "reg:5000/app:1", "linux/arm64")
    assert (answer.name, answer.config, answer.read_ahead) == ("reg:5000/app:1", b"cfg",
                                                               ("sha256:l",))
    assert answer.manifest_content == b"{}"  # no index: the target is the manifest


@pytest.mark.parametrize("daemon", [True], indirect=True)
def test_a_failed_resolve_still_reads_as_a_local_pulls_message(
    daemon: tuple[_Daemon, str]
) -> None:
    _, address = daemon
    with resolve_send.daemon_channel(address) as channel:
        pending = resolve_send.send_resolve(channel, "reg:5000/app:1", None)
        stub = daemon_pb2_grpc.DaemonStub(channel)
        request = daemon_client.resolve_request("reg:5000/app:1", None)
        with pytest.raises(errors.SnapshotterError) as caught:
            daemon_client.receive_answer(
                stub, address, request,
                lambda: daemon_client.parse_resolve_reply(pending.result(), address),
                lambda: False,
            )
    assert str(caught.value) == (
        "reg:5000/app:1: not found in the registry: manifest app:1 (HTTP 404)")


def test_an_answer_that_does_not_parse_is_a_clear_error() -> None:
    with pytest.raises(errors.SnapshotterError, match="does not parse"):
        daemon_client.parse_resolve_reply(b"\x0a\xff\xff\xff", "/run/d.sock")
