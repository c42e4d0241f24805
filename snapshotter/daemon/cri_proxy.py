"""A CRI image service proxy: kubelet's ``--image-service-endpoint`` points here, every
``ImageService`` call goes on to containerd's CRI socket, and the credentials of each
``PullImage`` are kept for the lazy reads of that image.

Requests and replies are forwarded as the bytes they came in: only ``PullImage`` is decoded,
for its image and auth, so CRI fields lazysnap does not know reach containerd untouched. Every
ImageService RPC is unary (CRI has no streaming image call), and unknown methods of the service
are forwarded as unary too. The proxy never makes a pull fail that would work without it: when
capturing fails, the request is forwarded anyway and the log says why, without the secret.
When containerd's socket is down, calls fail at once with UNAVAILABLE: the channel does not
wait for a connection, so kubelet never hangs on the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from registry import CredentialProvider, InvalidReferenceError, Reference, parse_reference
from snapshotter._proto import cri_image_pb2
from snapshotter.daemon.cri_credentials import CriCredentials
from snapshotter.daemon.cri_pull_auth import Captured, CaptureRefused, PullAuth, capture
from snapshotter.daemon.pushed_credentials import PushedCredentials
from snapshotter.daemon_api import RegistryAuthError, RegistryDeniedError

# grpc's handler classes are generic only in their type stubs.
if TYPE_CHECKING:
    _BytesHandler = grpc.GenericRpcHandler[bytes, bytes]
else:
    _BytesHandler = grpc.GenericRpcHandler

log = logging.getLogger(__name__)

# runtime.v1 is what kubelet speaks since 1.26; v1alpha2 (same messages) for older kubelets.
IMAGE_SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
PULL_IMAGE = "PullImage"
# containerd's own CRI message limits: anything it takes, the proxy takes.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
WORKERS = 32
# Without a deadline from kubelet (it sets none on pulls) the upstream call has none either.
_NO_DEADLINE_SECONDS = 365 * 24 * 3600.0
# Headers gRPC sets itself on the upstream call.
_RESERVED_METADATA = ("user-agent", "content-type", "te", "grpc-")

# Raises unless the registry lets the credentials read the image (the daemon's check_access).
Verify = Callable[[CredentialProvider, str, Reference | None], None]

def pull_auth(request: bytes) -> PullAuth:
    """The image and auth of a serialized ``PullImageRequest``; DecodeError if it is not one."""
    message = cri_image_pb2.PullImageRequest.FromString(request)
    auth = message.auth
    return PullAuth(
        image=message.image.image, username=auth.username, password=auth.password,
        auth=auth.auth, server_address=auth.server_address,
        identity_token=auth.identity_token, registry_token=auth.registry_token,
    )


def _forwarded_metadata(
    metadata: Sequence[tuple[str, str | bytes]] | None,
) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in metadata or () if not k.startswith(_RESERVED_METADATA)
                 and not k.startswith(":"))


class ImageServiceProxy(_BytesHandler):
    """Forwards the ImageService methods over ``channel``; captures PullImage credentials."""

    def __init__(
        self,
        channel: grpc.Channel,
        credentials: CriCredentials,
        verify: Verify | None = None,
        on_pulled: Callable[[str], None] | None = None,
    ) -> None:
        """``on_pulled`` is given the image of each PullImage containerd answered; it must
        return at once (``[index] publish`` queues a lookup)."""
        self._channel = channel
        self._credentials = credentials
        self._verify = verify
        self._on_pulled = on_pulled
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method  # "/runtime.v1.ImageService/PullImage"
        service, _, name = method.lstrip("/").partition("/")
        if service not in IMAGE_SERVICES or not name:
            return None  # gRPC answers UNIMPLEMENTED
        call = self._calls.get(method)
        if call is None:
            # No serializers: the bytes go out as they came in.
            call = self._channel.unary_unary(method, None, None)
            self._calls[method] = call

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            if name == PULL_IMAGE:
                try:
                    self._capture(request)
                except Exception as exc:  # a capture bug must never fail the pull
                    log.error("cri pull credentials not kept; pull forwarded",
                              extra={"reason": type(exc).__name__})
                reply = _forward(call, request, context)
                self._pulled(request)
                return reply
            return _forward(call, request, context)

        return grpc.unary_unary_rpc_method_handler(forward)

    def _pulled(self, request: bytes) -> None:
        if self._on_pulled is None:
            return
        try:
            self._on_pulled(cri_image_pb2.PullImageRequest.FromString(request).image.image)
        except Exception as exc:  # the pull succeeded: nothing after it may fail it
            log.error("cri pull not passed on to index publish",
                      extra={"reason": type(exc).__name__})

    def _capture(self, request: bytes) -> None:
        try:
            pull = pull_auth(request)
        except DecodeError:
            log.warning("cri pull not understood; forwarded as it is",
                        extra={"reason": "not a PullImageRequest"})
            return
        if not pull.has_secret():
            return
        try:
            captured = capture(pull)
            if self._accepted(pull.image, captured):
                self._credentials.capture(captured.host, captured.repository,
                                          captured.credentials)
        except CaptureRefused as exc:
            log.warning("cri pull credentials not kept; pull forwarded",
                        extra={"image": _loggable(pull.image), "reason": str(exc)})
        except OSError as exc:
            log.warning("cri pull credentials kept in memory only; pull forwarded",
                        extra={"image": _loggable(pull.image),
                               "reason": exc.strerror or type(exc).__name__})


    def _accepted(self, image: str, captured: Captured) -> bool:
        """Whether the registry accepts the captured set, checked before it replaces the stored
        one: a wrong auth in one PullImage must not break the lazy reads that work."""
        stored = self._credentials.stored(captured.host, captured.repository)
        if self._verify is None or stored == captured.credentials:
            return True
        candidate = PushedCredentials(None)
        candidate.set(captured.host, captured.repository, captured.credentials, 0)
        try:
            self._verify(candidate, captured.host, parse_reference(image))
        except (RegistryAuthError, RegistryDeniedError) as exc:
            # Registry error texts name hosts, repositories and statuses, never credentials.
            log.warning("cri pull credentials refused by the registry; the stored ones stay",
                        extra={"image": _loggable(image), "reason": str(exc)})
            return False
        except Exception as exc:  # the registry is down, the daemon stopping: nothing known
            if stored is not None:
                log.warning("cri pull credentials not checked; the stored ones stay",
                            extra={"image": _loggable(image), "reason": type(exc).__name__,
                                   "error": str(exc)[:500]})
                return False
        return True


def _loggable(image: str) -> str:
    """The image reference, or a placeholder when it is not one: a string kubelet sent by
    mistake may hold anything, a secret included."""
    try:
        return str(parse_reference(image))
    except InvalidReferenceError:
        return "<not a reference>"


def _forward(
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes], request: bytes, context: grpc.ServicerContext
) -> bytes:
    remaining = context.time_remaining()
    timeout = None if remaining is None or remaining > _NO_DEADLINE_SECONDS else remaining
    future = call.future(request, timeout=timeout,
                         metadata=_forwarded_metadata(context.invocation_metadata()))
    context.add_callback(future.cancel)  # kubelet gave up: so does containerd's call
    try:
        reply: bytes = future.result()
        return reply
    except grpc.RpcError as exc:
        failed: grpc.Call = exc  # type: ignore[assignment]
        context.set_trailing_metadata(failed.trailing_metadata() or ())
        context.abort(failed.code(), failed.details() or "")
    except grpc.FutureCancelledError:
        context.abort(grpc.StatusCode.CANCELLED, "cancelled")


def upstream_channel(address: str) -> grpc.Channel:
    """A channel to containerd's CRI socket that reconnects fast once containerd is back."""
    return grpc.insecure_channel(
        f"unix:{address}",
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )


def proxy_server(handler: ImageServiceProxy) -> grpc.Server:
    """The proxy's own server and thread pool: a slow pull never takes a worker from the
    snapshotter service that the same pull calls back into."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cri-proxy"),
        handlers=[handler],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    return server

