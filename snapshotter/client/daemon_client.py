"""The lazysnap daemon's gRPC client, as ``lazysnap pull --snapshotter-address`` uses it:
Status, SetCredentials, PrepareAhead and Resolve, and the way back from a failed Resolve to the
message a local pull prints.

Imported right after the Resolve RPC is sent (``client.resolve_send`` sends it without the
generated protobuf module), so it imports nothing of ``registry`` or trio at module level (see
``snapshotter.commands.pull``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.client.resolve_send import DaemonCannotResolve, daemon_channel
from snapshotter.daemon_api import (
    RESOLVE_FAILURE_KEY,
    RESOLVE_RPC_TIMEOUT_SECONDS,
    ResolveAnswer,
)
from snapshotter.errors import SnapshotterError

if TYPE_CHECKING:
    from registry import Credentials
    from snapshotter.client.unpacker import UnpackPlan

log = logging.getLogger(__name__)

DAEMON_RPC_TIMEOUT = 5.0  # Status, PrepareAhead: answered from memory
# ImagePulled only queues a job: a daemon that takes longer is busy, and the pull is done.
IMAGE_PULLED_TIMEOUT = 0.5


def rpc_detail(exc: grpc.RpcError) -> str:
    return (exc.details() or "") if isinstance(exc, grpc.Call) else str(exc)


def daemon_stub_on(channel: grpc.Channel) -> daemon_pb2_grpc.DaemonStub:
    """The stub on ``daemon_channel``, made once the Resolve is out (``client.resolve_send``)."""
    return daemon_pb2_grpc.DaemonStub(channel)


def check_daemon(stub: daemon_pb2_grpc.DaemonStub, address: str) -> None:
    try:
        stub.Status(daemon_pb2.StatusRequest(), timeout=DAEMON_RPC_TIMEOUT)
    except grpc.RpcError as exc:
        raise SnapshotterError(
            f"lazysnap daemon at {address} does not answer: {rpc_detail(exc)}"
        ) from exc


# -- credentials ------------------------------------------------------------------------------


def credentials_request(credentials: Credentials, image: str) -> daemon_pb2.SetCredentialsRequest:
    """For the repository of ``image`` on its registry (the daemon parses the reference)."""
    secret = credentials.password or credentials.identity_token
    return daemon_pb2.SetCredentialsRequest(
        image=image, username=credentials.username if credentials.password else "", secret=secret
    )


def user_credentials_request(
    image: str, username: str, password: str
) -> daemon_pb2.SetCredentialsRequest:
    """``--user``'s credentials, for the registry of ``image``."""
    return daemon_pb2.SetCredentialsRequest(image=image, username=username, secret=password)


def send_credentials(address: str, request: daemon_pb2.SetCredentialsRequest) -> None:
    """``set_credentials`` on a channel of its own, for a pull that resolves locally."""
    with daemon_channel(address) as channel:
        set_credentials(daemon_pb2_grpc.DaemonStub(channel), address, request)


def set_credentials(
    stub: daemon_pb2_grpc.DaemonStub, address: str, request: daemon_pb2.SetCredentialsRequest
) -> None:
    """The daemon fetches the lazy layers itself, later, with its own registry client. It
    first checks the credentials against the registry, hence the resolution's deadline."""
    try:
        stub.SetCredentials(request, timeout=RESOLVE_RPC_TIMEOUT_SECONDS)
    except grpc.RpcError as exc:
        kind = failure_kind(exc)
        if request.image and (kind is not None or _code(exc) == grpc.StatusCode.INVALID_ARGUMENT):
            # The registry refused them, or the daemon could not parse the image reference:
            # the message a local pull prints.
            message = resolve_failure(request.image, address, _code(exc), rpc_detail(exc), kind)
            raise SnapshotterError(message or rpc_detail(exc)) from exc
        # The details are the daemon's validation message; it never repeats the secret.
        raise SnapshotterError(
            f"lazysnap daemon at {address} did not take the credentials: {rpc_detail(exc)}"
        ) from exc


def hand_user_credentials(
    channel: grpc.Channel, address: str, image: str, user: Callable[[], tuple[str, str]]
) -> None:
    """``--user``'s credentials, before the Resolve: the daemon must answer first (before
    ``user`` may ask for the password on the terminal), then take them."""
    stub = daemon_stub_on(channel)
    check_daemon(stub, address)
    name, password = user()
    set_credentials(stub, address, user_credentials_request(image, name, password))


def hand_docker_config_credentials(
    stub: daemon_pb2_grpc.DaemonStub, address: str, image: str
) -> bool:
    """The daemon's docker config had nothing for this registry: hand it the caller's, as a
    local pull would have used them. True if there were any."""
    import trio  # noqa: PLC0415 (only on this rare path)

    from registry import DockerConfigCredentials, parse_reference  # noqa: PLC0415

    domain = parse_reference(image).domain
    found = trio.run(DockerConfigCredentials().credentials_for, domain)
    if found is None:
        return False
    log.info("registry credentials from the docker config handed over host=%s", domain)
    set_credentials(stub, address, credentials_request(found, image))
    return True


# -- Resolve ----------------------------------------------------------------------------------


def resolve_request(image: str, platform: str | None) -> daemon_pb2.ResolveRequest:
    return daemon_pb2.ResolveRequest(image=image, platform=platform or "")


def parse_resolve_reply(raw: bytes, address: str) -> daemon_pb2.ResolveResponse:
    """The answer of ``resolve_send.send_resolve``, which the channel hands over unparsed."""
    try:
        return daemon_pb2.ResolveResponse.FromString(raw)
    except DecodeError as exc:
        raise SnapshotterError(
            f"lazysnap daemon at {address} sent a Resolve answer that does not parse: {exc}"
        ) from exc


def resolved_from_proto(reply: daemon_pb2.ResolveResponse) -> ResolveAnswer:
    """Without an index the daemon sends the manifest once, as the target."""
    has_index = reply.manifest_digest != reply.target_digest
    return ResolveAnswer(
        name=reply.name,
        target_media_type=reply.target_media_type,
        target_digest=reply.target_digest,
        target_content=bytes(reply.target_content),
        manifest_media_type=reply.manifest_media_type,
        manifest_digest=reply.manifest_digest,
        manifest_content=bytes(reply.manifest if has_index else reply.target_content),
        config=bytes(reply.config),
        read_ahead=tuple(reply.read_ahead),
    )


def failure_kind(exc: grpc.RpcError) -> str | None:
    """The kind of registry failure the daemon named in the trailing metadata, if any."""
    if not isinstance(exc, grpc.Call):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RESOLVE_FAILURE_KEY:
            return str(value)
    return None


def resolve_failure(
    image: str, address: str, code: grpc.StatusCode, detail: str, kind: str | None
) -> str | None:
    """The one-line message a local resolution would print for the daemon's error, or None when
    this daemon cannot resolve at all. ``kind`` is the daemon's RESOLVE_FAILURE_KEY: without
    it the failure is the call's own (the daemon went away, or our deadline passed)."""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return None  # an older daemon, or lazy pulling disabled: resolve here
    if kind == "not-found" or code == grpc.StatusCode.NOT_FOUND:
        return f"{image}: not found in the registry: {detail}"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return detail
    if kind is not None:
        return f"{image}: {detail}"  # the daemon's text names the registry error as a local one
    return f"lazysnap daemon at {address} could not resolve {image}: {code.name}: {detail}"


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN


def receive_answer(
    stub: daemon_pb2_grpc.DaemonStub,
    address: str,
    request: daemon_pb2.ResolveRequest,
    call: Callable[[], daemon_pb2.ResolveResponse],
    hand_credentials: Callable[[], bool],
) -> ResolveAnswer:
    """``call``'s answer. A registry that wants credentials gets one more Resolve if
    ``hand_credentials`` could give the daemon some; a failure becomes a SnapshotterError with a
    local pull's message, and DaemonCannotResolve means: resolve locally."""
    try:
        return resolved_from_proto(call())
    except grpc.RpcError as first:
        failure = first
        code = _code(first)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and (
            hand_credentials()
        ):
            try:
                return resolved_from_proto(
                    stub.Resolve(request, timeout=RESOLVE_RPC_TIMEOUT_SECONDS)
                )
            except grpc.RpcError as second:
                failure = second
                code = _code(second)
    message = resolve_failure(
        request.image, address, code, rpc_detail(failure), failure_kind(failure)
    )
    if message is None:
        raise DaemonCannotResolve()
    raise SnapshotterError(message)


# -- PrepareAhead -----------------------------------------------------------------------------


def announcer(address: str) -> Callable[[UnpackPlan], None]:
    """Tell the daemon which layer Prepares come next, so it reads their TOCs meanwhile. Only
    an optimisation: a daemon that does not answer (or predates the RPC) is left alone."""

    def announce(plan: UnpackPlan) -> None:
        request = daemon_pb2.PrepareAheadRequest(
            layers=[
                daemon_pb2.AnnouncedLayer(labels=dict(layer.labels), size=layer.descriptor.size)
                for layer in plan.layers
            ]
        )
        try:
            with grpc.insecure_channel(f"unix:{address}") as channel:
                daemon_pb2_grpc.DaemonStub(channel).PrepareAhead(
                    request, timeout=DAEMON_RPC_TIMEOUT
                )
        except grpc.RpcError as exc:
            log.debug("prepare-ahead not taken: %s", exc.code() if isinstance(exc, grpc.Call)
                      else exc)

    return announce


# -- ImagePulled ------------------------------------------------------------------------------


def tell_image_pulled(address: str, image: str, manifest_digest: str, namespace: str) -> bool:
    """Tell the daemon that ``image`` was pulled in full, for ``[index] publish``. The pull has
    succeeded already: a daemon that is slow, gone or older is left alone. Whether it queued."""
    request = daemon_pb2.ImagePulledRequest(
        image=image, manifest_digest=manifest_digest, namespace=namespace
    )
    try:
        with grpc.insecure_channel(f"unix:{address}") as channel:
            reply = daemon_pb2_grpc.DaemonStub(channel).ImagePulled(
                request, timeout=IMAGE_PULLED_TIMEOUT
            )
    except grpc.RpcError as exc:
        log.debug("image-pulled not taken: %s", exc.code() if isinstance(exc, grpc.Call)
                  else exc)
        return False
    log.debug("image-pulled queued=%s", reply.queued)
    return bool(reply.queued)
