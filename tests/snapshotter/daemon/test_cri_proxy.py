"""The CRI image service proxy against a fake containerd: bytes forwarded untouched, replies and
errors passed back, PullImage credentials captured, containerd down answered at once."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import trio

from registry import Credentials
from snapshotter.daemon import cri_proxy
from snapshotter.daemon.cri_credentials import CriCredentials
from snapshotter.daemon.cri_proxy import ImageServiceProxy, proxy_server, upstream_channel
from tests.support._cri_proto import cri_api_pb2 as cri
from tests.support._cri_proto import cri_api_pb2_grpc as cri_grpc

# grpc's handler classes are generic only in their type stubs.
if TYPE_CHECKING:
    _BytesHandler = grpc.GenericRpcHandler[bytes, bytes]
else:
    _BytesHandler = grpc.GenericRpcHandler

IMAGE = "reg.example:5000/team/app:1"
PASSWORD = "proxy-Pa55word"
# Field 99 of PullImageRequest, unknown to lazysnap's restatement: a newer CRI field.
UNKNOWN_FIELD = b"\x9a\x06\x05newer"


@dataclass
class FakeContainerd:
    """Records each call's method and raw request; answers from ``replies`` or aborts."""

    calls: list[tuple[str, bytes]] = field(default_factory=list)
    replies: dict[str, bytes] = field(default_factory=dict)
    abort: tuple[grpc.StatusCode, str] | None = None
    hold: threading.Event | None = None  # set: block each call until the caller gives up
    ended: threading.Event = field(default_factory=threading.Event)

    def handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        fake = self

        class Handler(_BytesHandler):
            def service(self, details: grpc.HandlerCallDetails
                        ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
                method = str(details.method)

                def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
                    fake.calls.append((method, request))
                    if fake.hold is not None:
                        context.add_callback(fake.ended.set)
                        fake.hold.wait(10)
                    if fake.abort is not None:
                        context.abort(*fake.abort)
                    return fake.replies.get(method, b"")

                return grpc.unary_unary_rpc_method_handler(answer)

        return Handler()


@dataclass
class Setup:
    containerd: FakeContainerd
    store: CriCredentials
    proxy_address: Path
    containerd_address: Path

    def stub(self, channel: grpc.Channel) -> cri_grpc.ImageServiceStub:
        return cri_grpc.ImageServiceStub(channel)


def _serve_fake(fake: FakeContainerd, address: Path) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[fake.handler()])
    server.add_insecure_port(f"unix:{address}")
    server.start()
    return server


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    fake = FakeContainerd()
    containerd_address, proxy_address = tmp_path / "containerd.sock", tmp_path / "proxy.sock"
    upstream = _serve_fake(fake, containerd_address)
    store = CriCredentials(tmp_path / "run" / "cri.json", None)
    channel = upstream_channel(str(containerd_address))
    server = proxy_server(ImageServiceProxy(channel, store))
    server.add_insecure_port(f"unix:{proxy_address}")
    server.start()
    try:
        yield Setup(fake, store, proxy_address, containerd_address)
    finally:
        server.stop(None).wait()
        upstream.stop(None).wait()
        channel.close()


def _pull_request(**auth: str) -> cri.PullImageRequest:
    return cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE, annotations={"a": "b"}),
                                auth=cri.AuthConfig(**auth))


def test_a_pull_is_forwarded_byte_for_byte_and_its_credentials_kept(setup: Setup) -> None:
    reply = cri.PullImageResponse(image_ref="sha256:" + "a" * 64).SerializeToString()
    setup.containerd.replies["/runtime.v1.ImageService/PullImage"] = reply
    sent = _pull_request(username="bob", password=PASSWORD,
                         server_address="reg.example:5000").SerializeToString() + UNKNOWN_FIELD
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        raw = channel.unary_unary("/runtime.v1.ImageService/PullImage", None, None)
        assert raw(sent, timeout=10) == reply
    assert setup.containerd.calls == [("/runtime.v1.ImageService/PullImage", sent)]
    assert setup.store.entries() == [("reg.example:5000", "team/app")]


def test_every_image_service_method_is_forwarded(setup: Setup) -> None:
    listed = cri.ListImagesResponse(images=[cri.Image(id="sha256:x", repo_tags=[IMAGE])])
    setup.containerd.replies["/runtime.v1.ImageService/ListImages"] = listed.SerializeToString()
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        stub = setup.stub(channel)
        assert stub.ListImages(cri.ListImagesRequest(), timeout=10) == listed
        stub.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE)), timeout=10)
        stub.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=IMAGE)), timeout=10)
        # A method the proxy has never heard of (ImageFsInfo is not in the tests' proto).
        channel.unary_unary("/runtime.v1.ImageService/ImageFsInfo", None, None)(b"", timeout=10)
        with pytest.raises(grpc.RpcError) as other:
            cri_grpc.RuntimeServiceStub(channel).Version(cri.VersionRequest(), timeout=10)
    assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert [method.rsplit("/", 1)[1] for method, _ in setup.containerd.calls] == [
        "ListImages", "ImageStatus", "RemoveImage", "ImageFsInfo"
    ]


def test_containerd_errors_come_back_as_they_are(setup: Setup) -> None:
    setup.containerd.abort = (grpc.StatusCode.NOT_FOUND, "failed to resolve reference")
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel, \
            pytest.raises(grpc.RpcError) as failed:
        setup.stub(channel).PullImage(_pull_request(), timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "failed to resolve reference"


def test_a_malformed_pull_is_forwarded_untouched(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1 claims a length far past the end
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        channel.unary_unary("/runtime.v1.ImageService/PullImage", None, None)(garbage, timeout=10)
    assert setup.containerd.calls == [("/runtime.v1.ImageService/PullImage", garbage)]
    assert "cri pull not understood; forwarded as it is" in caplog.text


@pytest.mark.parametrize(("image", "auth"), [
    (IMAGE, {"auth": "not base64", "server_address": "reg.example:5000"}),
    (IMAGE, {"username": "bob", "password": PASSWORD, "server_address": "other.example"}),
    (f"bob:{PASSWORD}@reg.example/app", {"username": "bob", "password": PASSWORD}),
])
def test_credentials_that_cannot_be_kept_never_fail_the_pull(
    setup: Setup, caplog: pytest.LogCaptureFixture, image: str, auth: dict[str, str]
) -> None:
    request = cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=cri.AuthConfig(**auth))
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        setup.stub(channel).PullImage(request, timeout=10)
    assert len(setup.containerd.calls) == 1
    assert setup.store.entries() == []
    assert "cri pull credentials not kept; pull forwarded" in caplog.text
    assert PASSWORD not in caplog.text and all(
        PASSWORD not in str(record.__dict__) for record in caplog.records
    )


def test_a_capture_that_cannot_save_keeps_memory_and_forwards(
    setup: Setup, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    (tmp_path / "run").write_text("a file where the directory should be")
    encoded = base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        setup.stub(channel).PullImage(_pull_request(auth=encoded), timeout=10)
    assert len(setup.containerd.calls) == 1
    assert "kept in memory only" in caplog.text


def test_a_capture_bug_never_fails_the_pull(
    setup: Setup, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(request: bytes) -> None:
        raise KeyError(PASSWORD)

    monkeypatch.setattr(cri_proxy, "pull_auth", broken)
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        setup.stub(channel).PullImage(_pull_request(username="bob", password=PASSWORD),
                                      timeout=10)
    assert len(setup.containerd.calls) == 1
    assert any(getattr(record, "reason", None) == "KeyError" for record in caplog.records)
    assert all(PASSWORD not in str(record.__dict__) for record in caplog.records)


def test_with_containerd_down_the_proxy_answers_unavailable_at_once(setup: Setup) -> None:
    setup.containerd_address.unlink()  # as after containerd stopped: nothing listens
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        for _ in range(3):  # the first call and the ones during the reconnect backoff
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                setup.stub(channel).PullImage(_pull_request(), timeout=30)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 2.0


def test_an_oversized_request_is_refused_before_containerd(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    too_big = b"\x0a" + b"x" * (cri_proxy.MAX_MESSAGE_BYTES + 10)
    with grpc.insecure_channel(f"unix:{setup.proxy_address}", options=[
        ("grpc.max_send_message_length", -1)
    ]) as channel, pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/runtime.v1.ImageService/PullImage", None, None)(
            too_big, timeout=30
        )
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert setup.containerd.calls == []


def test_kubelet_giving_up_ends_the_upstream_call(setup: Setup) -> None:
    setup.containerd.hold = threading.Event()
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel, \
            pytest.raises(grpc.RpcError) as failed:
        setup.stub(channel).PullImage(_pull_request(), timeout=0.5)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # containerd's side of the call ended too (kubelet's deadline was passed on).
    assert setup.containerd.ended.wait(5)


def test_v1alpha2_is_forwarded_too(setup: Setup) -> None:
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        raw = channel.unary_unary("/runtime.v1alpha2.ImageService/PullImage", None, None)
        raw(_pull_request(username="bob", password=PASSWORD).SerializeToString(), timeout=10)
    assert setup.store.entries() == [("reg.example:5000", "team/app")]
    assert setup.containerd.calls[0][0] == "/runtime.v1alpha2.ImageService/PullImage"


def test_the_captured_credentials_are_the_ones_sent(setup: Setup) -> None:
    with grpc.insecure_channel(f"unix:{setup.proxy_address}") as channel:
        setup.stub(channel).PullImage(_pull_request(identity_token="tok-1"), timeout=10)

    async def lookup() -> Credentials | None:
        return await setup.store.credentials_for("reg.example:5000", "team/app")

    assert trio.run(lookup) == Credentials(identity_token="tok-1")


class FakeRegistryCheck:
    """The daemon's check_access: accepts only ``accepted``; raises ``error`` when set."""

    def __init__(self, accepted: str) -> None:
        self.accepted = accepted
        self.error: Exception | None = None
        self.checked: list[tuple[str, str]] = []

    def __call__(self, credentials: object, registry: str, ref: object) -> None:
        from snapshotter.daemon_api import RegistryAuthError  # noqa: PLC0415

        async def lookup() -> Credentials | None:
            return await credentials.credentials_for(registry, "team/app")  # type: ignore[attr-defined, no-any-return]

        found = trio.run(lookup)
        self.checked.append((registry, str(ref)))
        if self.error is not None:
            raise self.error
        if found is None or found.password != self.accepted:
            raise RegistryAuthError("AuthenticationError: refused (HTTP 401)")


def _pull_through(tmp_path: Path, check: FakeRegistryCheck, passwords: list[str]
                  ) -> CriCredentials:
    fake = FakeContainerd()
    containerd_address, proxy_address = tmp_path / "containerd.sock", tmp_path / "proxy.sock"
    upstream = _serve_fake(fake, containerd_address)
    store = CriCredentials(tmp_path / "run" / "cri.json", None)
    channel = upstream_channel(str(containerd_address))
    server = proxy_server(ImageServiceProxy(channel, store, check))
    server.add_insecure_port(f"unix:{proxy_address}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{proxy_address}") as client:
            for password in passwords:
                cri_grpc.ImageServiceStub(client).PullImage(
                    _pull_request(username="bob", password=password), timeout=10)
        assert len(fake.calls) == len(passwords)  # every pull forwarded, checked or not
    finally:
        server.stop(None).wait()
        upstream.stop(None).wait()
        channel.close()
    return store


def _stored_password(store: CriCredentials) -> str | None:
    found = store.stored("reg.example:5000", "team/app")
    return None if found is None else found.password


def test_a_wrong_captured_password_does_not_replace_a_working_one(tmp_path: Path) -> None:
    check = FakeRegistryCheck(accepted=PASSWORD)
    store = _pull_through(tmp_path, check, [PASSWORD, "wrong-pw", PASSWORD])
    assert _stored_password(store) == PASSWORD
    # The same set again is not checked again: only the first and the wrong one were.
    assert [r for r, _ in check.checked] == ["reg.example:5000"] * 2
    assert "wrong-pw" not in (tmp_path / "run" / "cri.json").read_text()


def test_a_new_password_the_registry_accepts_replaces_the_old(tmp_path: Path) -> None:
    check = FakeRegistryCheck(accepted="rotated-pw")
    store = _pull_through(tmp_path, check, ["rotated-pw"])
    assert _stored_password(store) == "rotated-pw"


def test_an_unchecked_set_is_kept_only_when_none_is_stored(tmp_path: Path) -> None:
    check = FakeRegistryCheck(accepted=PASSWORD)
    check.error = TimeoutError()
    store = _pull_through(tmp_path, check, ["first-pw", "second-pw"])
    assert _stored_password(store) == "first-pw"


@contextlib.contextmanager
def _proxy_telling(tmp_path: Path, fake: FakeContainerd,
                   on_pulled: Callable[[str], None]) -> Iterator[grpc.Channel]:
    """A proxy in front of ``fake`` that gives each answered PullImage to ``on_pulled``."""
    upstream = _serve_fake(fake, tmp_path / "containerd.sock")
    channel = upstream_channel(str(tmp_path / "containerd.sock"))
    store = CriCredentials(tmp_path / "run" / "cri.json", None)
    server = proxy_server(ImageServiceProxy(channel, store, on_pulled=on_pulled))
    server.add_insecure_port(f"unix:{tmp_path / 'proxy.sock'}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{tmp_path / 'proxy.sock'}") as client:
            yield client
    finally:
        server.stop(None).wait()
        upstream.stop(None).wait()
        channel.close()


def test_each_pull_containerd_answered_is_passed_on_and_a_failed_one_is_not(
    tmp_path: Path,
) -> None:
    fake = FakeContainerd()
    told: list[str] = []
    with _proxy_telling(tmp_path, fake, told.append) as channel:
        stub = cri_grpc.ImageServiceStub(channel)
        stub.PullImage(_pull_request(), timeout=10)
        stub.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=IMAGE)), timeout=10)
        assert told == [IMAGE]
        fake.abort = (grpc.StatusCode.NOT_FOUND, "no such image")
        with pytest.raises(grpc.RpcError):
            stub.PullImage(_pull_request(), timeout=10)
    assert told == [IMAGE], "a pull containerd refused is not passed on"


def test_a_failing_pull_listener_never_fails_the_pull(tmp_path: Path) -> None:
    def broken(image: str) -> None:
        raise RuntimeError("listener bug")

    reply = cri.PullImageResponse(image_ref="sha256:" + "b" * 64)
    fake = FakeContainerd(replies={"/runtime.v1.ImageService/PullImage":
                                   reply.SerializeToString()})
    with _proxy_telling(tmp_path, fake, broken) as channel:
        answer = cri_grpc.ImageServiceStub(channel).PullImage(_pull_request(), timeout=10)
    assert answer.image_ref == reply.image_ref
