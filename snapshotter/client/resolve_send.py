"""The first RPC of ``lazysnap pull --snapshotter-address``: ``Daemon/Resolve``, sent with grpc
and nothing else.

Everything the CLI imports before this request leaves delays the daemon's whole pull (resolve,
TOC fetch, index build). The generated protobuf module costs about a fifth of that start-up
(``google.protobuf``'s descriptor pool and message classes): so the request, two string fields,
is encoded here, and the answer stays bytes until ``daemon_client`` parses it, imported while
the daemon works. A unit test keeps the encoding equal to the generated module's.
"""

from __future__ import annotations

import grpc

from snapshotter.daemon_api import (
    MAX_RESOLVE_REQUEST_BYTES,
    MAX_RESOLVE_RESPONSE_BYTES,
    RESOLVE_RPC_TIMEOUT_SECONDS,
)

# daemon.proto: package lazysnap.daemon.v1, service Daemon, rpc Resolve(ResolveRequest).
RESOLVE_METHOD = "/lazysnap.daemon.v1.Daemon/Resolve"
# ResolveRequest's fields: 1 image, 2 platform, both strings (wire type 2: length-delimited).
_IMAGE_TAG = 0x0A
_PLATFORM_TAG = 0x12


class DaemonCannotResolve(Exception):
    """The daemon has no Resolve (an older one, or lazy pulling off): resolve locally."""


def daemon_channel(address: str) -> grpc.Channel:
    """The one channel to the daemon: Status, SetCredentials and Resolve share its connection.
    A Resolve answer carries at most an index, a manifest and a config."""
    return grpc.insecure_channel(
        f"unix:{address}",
        options=[
            ("grpc.max_receive_message_length", MAX_RESOLVE_RESPONSE_BYTES),
            ("grpc.max_send_message_length", MAX_RESOLVE_REQUEST_BYTES),
        ],
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string_field(tag: int, value: str) -> bytes:
    # proto3 leaves a field at its default (the empty string) off the wire.
    if not value:
        return b""
    data = value.encode("utf-8")
    return bytes([tag]) + _varint(len(data)) + data


def encode_resolve_request(image: str, platform: str | None) -> bytes:
    """``daemon_pb2.ResolveRequest(image=image, platform=platform or "")``, serialized."""
    return _string_field(_IMAGE_TAG, image) + _string_field(_PLATFORM_TAG, platform or "")


def send_resolve(
    channel: grpc.Channel, image: str, platform: str | None
) -> grpc.Future[bytes]:
    """The Resolve in flight; its result is the serialized ``ResolveResponse``."""
    # No serializers: bytes in, bytes out.
    call = channel.unary_unary(RESOLVE_METHOD, None, None)
    return call.future(
        encode_resolve_request(image, platform), timeout=RESOLVE_RPC_TIMEOUT_SECONDS
    )
