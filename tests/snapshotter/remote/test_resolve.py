"""Daemon/Resolve without a daemon: the documents' round trip through the protobuf messages, the
daemon's error classification, and the CLI's way back to a local pull's messages."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import grpc
import pytest
import trio

import registry
from registry.client import DEFAULT_MAX_FETCH
from registry.manifest import MAX_MANIFEST_BYTES
from snapshotter import errors
from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.client import daemon_client
from snapshotter.client import documents as client_documents
from snapshotter.client import pull as image_pull
from snapshotter.client.containerd_client import (
    DEFAULT_CONTAINERD_ADDRESS as CLIENT_DEFAULT_ADDRESS,
)
from snapshotter.commands import pull
from snapshotter.commands._containerd_args import DEFAULT_CONTAINERD_ADDRESS
from snapshotter.daemon.grpc_service import DaemonServicer, resolved_to_proto, status_for
from snapshotter.daemon.pushed_credentials import PushedCredentials
from snapshotter.daemon_api import (
    MAX_CONFIG_BYTES,
    MAX_RESOLVE_RESPONSE_BYTES,
    ImageNotFoundError,
    RegistryAuthError,
    ResolveAnswer,
    ResolveError,
    ResolveTimeoutError,
)
from snapshotter.remote.resolve import (
    answer_from_documents,
    fetch_image_documents,
    map_registry_errors,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


CONFIG = json.dumps({"rootfs": {"type": "layers", "diff_ids": [_digest(b"tar")]}}).encode()
LAYER = {"mediaType": GZIP_LAYER, "digest": _digest(b"gz"), "size": 2,
         "annotations": {"containerd.io/snapshot/stargz/toc.digest": _digest(b"toc")}}
MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
    "config": {"mediaType": OCI_CONFIG, "digest": _digest(CONFIG), "size": len(CONFIG)},
    "layers": [LAYER],
}).encode()
INDEX = json.dumps({
    "schemaVersion": 2, "mediaType": OCI_INDEX,
    "manifests": [{"mediaType": OCI_MANIFEST, "digest": _digest(MANIFEST), "size": len(MANIFEST),
                   "platform": {"os": "linux", "architecture": "amd64"}}],
}).encode()


def _documents(with_index: bool) -> client_documents.ImageDocuments:
    manifest = registry.parse_manifest(MANIFEST, OCI_MANIFEST)
    assert isinstance(manifest, registry.Manifest)
    top, media_type = (INDEX, OCI_INDEX) if with_index else (MANIFEST, OCI_MANIFEST)
    index = registry.parse_manifest(INDEX, OCI_INDEX) if with_index else None
    assert index is None or isinstance(index, registry.Index)
    return client_documents.ImageDocuments(
        "reg.example:5000/app:1", registry.Descriptor(media_type, _digest(top), len(top)), top,
        index, _digest(MANIFEST), MANIFEST, manifest, CONFIG,
    )


@pytest.mark.parametrize("with_index", [False, True])
def test_documents_survive_the_round_trip_through_resolve(with_index: bool) -> None:
    original = _documents(with_index)
    resolved = answer_from_documents(original, (LAYER["digest"],))  # type: ignore[arg-type]
    wire = daemon_pb2.ResolveResponse.FromString(resolved_to_proto(resolved).SerializeToString())
    # Without an index the manifest is the target: it travels once.
    assert wire.manifest == (MANIFEST if with_index else b"")
    back = daemon_client.resolved_from_proto(wire)
    assert back == resolved
    documents = client_documents.documents_from_answer(back)
    assert documents == original
    assert list(wire.read_ahead) == [LAYER["digest"]]


def test_a_target_that_claims_an_index_but_is_a_manifest_is_refused() -> None:
    resolved = answer_from_documents(_documents(with_index=False), ())
    broken = ResolveAnswer(
        resolved.name, OCI_MANIFEST, _digest(b"other"), MANIFEST, OCI_MANIFEST,
        resolved.manifest_digest, MANIFEST, CONFIG,
    )
    with pytest.raises(image_pull.UnpackError, match="not an image index"):
        client_documents.documents_from_answer(broken)


def test_resolve_request_carries_the_reference_as_typed() -> None:
    request = daemon_client.resolve_request("busybox", None)
    assert (request.image, request.platform) == ("busybox", "")
    assert daemon_client.resolve_request("busybox", "linux/arm64/v8").platform == "linux/arm64/v8"


def test_credentials_request_names_the_image_and_leaves_the_host_to_the_daemon() -> None:
    user = daemon_client.credentials_request(registry.Credentials("u", "pw"), "reg:5000/a")
    assert (user.host, user.image, user.username, user.secret) == ("", "reg:5000/a", "u", "pw")
    token = daemon_client.credentials_request(registry.Credentials(identity_token="tok"), "reg/a")
    assert (token.host, token.image, token.username, token.secret) == ("", "reg/a", "", "tok")


class FailingRegistry:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def resolve_image(
        self, ref: registry.Reference, platform: registry.Platform | None = None
    ) -> registry.ResolvedImage:
        raise self.exc

    async def fetch_manifest(
        self, ref: registry.Reference, digest_or_tag: str | None = None
    ) -> registry.ManifestContent:
        raise self.exc


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (registry.NotFoundError("manifest app:1 (HTTP 404)"), grpc.StatusCode.NOT_FOUND,
         "manifest app:1 (HTTP 404)"),
        (registry.AuthenticationError("401 from reg"), grpc.StatusCode.UNAUTHENTICATED,
         "AuthenticationError: 401 from reg"),
        (registry.AuthorizationError("403"), grpc.StatusCode.PERMISSION_DENIED,
         "AuthorizationError: 403"),
        (registry.RegistryTimeoutError("read timed out"), grpc.StatusCode.DEADLINE_EXCEEDED,
         "RegistryTimeoutError: read timed out"),
        (registry.TransportError("connection refused"), grpc.StatusCode.UNAVAILABLE,
         "TransportError: connection refused"),
    ],
)
def test_registry_failures_become_status_codes(
    raised: Exception, code: grpc.StatusCode, message: str
) -> None:
    client = FailingRegistry(raised)
    with pytest.raises(errors.SnapshotterError) as caught:
        trio.run(fetch_image_documents, client, "reg:5000/app:1", "")
    assert status_for(caught.value) == code
    assert str(caught.value) == message


def test_the_most_specific_registry_error_wins_and_stays_chained() -> None:
    original = registry.RegistryTimeoutError("read timed out")  # also a TransportError
    with pytest.raises(ResolveTimeoutError) as caught, map_registry_errors():
        raise original
    assert caught.value.__cause__ is original
    with pytest.raises(RegistryAuthError, match=r"^CredentialsError: helper failed$"), \
            map_registry_errors():
        raise registry.CredentialsError("helper failed")
    with pytest.raises(KeyError), map_registry_errors():
        raise KeyError("not a registry error: passes unchanged")


@pytest.mark.parametrize(("image", "platform"), [("Bad//Name", ""), ("app:1", "no-such-os")])
def test_bad_references_and_platforms_are_invalid_arguments(image: str, platform: str) -> None:
    client = FailingRegistry(AssertionError("the registry must not be asked"))
    with pytest.raises(errors.InvalidArgumentError) as caught:
        trio.run(fetch_image_documents, client, image, platform)
    assert status_for(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("code", "detail", "kind", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "manifest x (HTTP 404)", "not-found",
         "img: not found in the registry: manifest x (HTTP 404)"),
        (grpc.StatusCode.UNAUTHENTICATED, "AuthenticationError: 401", "auth",
         "img: AuthenticationError: 401"),
        (grpc.StatusCode.UNAVAILABLE, "TransportError: refused", "registry",
         "img: TransportError: refused"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "RegistryTimeoutError: registry did not answer",
         "timeout", "img: RegistryTimeoutError: registry did not answer"),
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid reference 'Bad//Name'", None,
         "invalid reference 'Bad//Name'"),
        (grpc.StatusCode.FAILED_PRECONDITION, "sha256:x is not an image manifest", None,
         "sha256:x is not an image manifest"),
        # Not the daemon's answer but the call's own failure: say so.
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None,
         "lazysnap daemon at /s.sock could not resolve img: DEADLINE_EXCEEDED: Deadline Exceeded"),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", None,
         "lazysnap daemon at /s.sock could not resolve img: UNAVAILABLE: Socket closed"),
        # Without the daemon's kind, a text shaped like a registry error is still the call's.
        (grpc.StatusCode.UNAVAILABLE, "ConnectionError: Socket closed", None,
         "lazysnap daemon at /s.sock could not resolve img: UNAVAILABLE: "
         "ConnectionError: Socket closed"),
        (grpc.StatusCode.UNIMPLEMENTED, "Method not found!", None, None),
    ],
)
def test_the_cli_maps_codes_back_to_a_local_pulls_messages(
    code: grpc.StatusCode, detail: str, kind: str | None, expected: str | None
) -> None:
    assert daemon_client.resolve_failure("img", "/s.sock", code, detail, kind) == expected


class _ResolveFails:
    """The part of the trio bridge that Daemon/Resolve uses, failing as the registry did."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def resolve(self, image: str, platform: str) -> client_documents.ImageDocuments:
        raise self.exc


class _NoSnapshots:
    def existing(self, keys: object) -> set[str]:
        return set()


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (RegistryAuthError("AuthenticationError: 401 from reg"),
         "reg:5000/app:1: AuthenticationError: 401 from reg"),
        (ImageNotFoundError("manifest app:1 (HTTP 404)"),
         "reg:5000/app:1: not found in the registry: manifest app:1 (HTTP 404)"),
        (ResolveTimeoutError("RegistryTimeoutError: registry did not answer within 30s"),
         "reg:5000/app:1: RegistryTimeoutError: registry did not answer within 30s"),
        (ResolveError("ProtocolError: bad answer"), "reg:5000/app:1: ProtocolError: bad answer"),
    ],
)
def test_the_failure_kind_crosses_the_rpc_as_metadata(
    tmp_path: Path, raised: Exception, expected: str
) -> None:
    from concurrent import futures  # noqa: PLC0415

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    daemon_pb2_grpc.add_DaemonServicer_to_server(
        DaemonServicer(_NoSnapshots(), None, _ResolveFails(raised)),  # type: ignore[arg-type]
        server,
    )
    address = str(tmp_path / "d.sock")
    server.add_insecure_port(f"unix:{address}")
    server.start()
    try:
        with daemon_client.daemon_channel(address) as channel:
            stub = daemon_pb2_grpc.DaemonStub(channel)
            request = daemon_client.resolve_request("reg:5000/app:1", None)
            with pytest.raises(errors.SnapshotterError) as caught:
                daemon_client.receive_answer(
                    stub, address, request, lambda: stub.Resolve(request, timeout=10),
                    lambda: False,
                )
    finally:
        server.stop(None)
    assert str(caught.value) == expected


class _RegistryChecks:
    """The part of the trio bridge that Daemon/SetCredentials uses: a registry that accepts
    only alice's password."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, str]] = []

    def check_access(
        self, credentials: registry.CredentialProvider, host: str, ref: registry.Reference | None
    ) -> None:
        repository = ref.path if ref is not None else ""
        found = trio.run(credentials.credentials_for, host, repository)
        assert found is not None
        self.checked.append((host, repository))
        if found.password != "right-pw":
            raise RegistryAuthError(f"AuthenticationError: manifest {repository}:1 (HTTP 401)")


def test_set_credentials_replaces_a_working_set_only_with_one_the_registry_accepts(
    tmp_path: Path,
) -> None:
    """Issue 15 item 7: a wrong password after a right one fails that pull with a local pull's
    message and leaves the right one in use."""
    from concurrent import futures  # noqa: PLC0415

    stored = PushedCredentials(None)
    checks = _RegistryChecks()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    daemon_pb2_grpc.add_DaemonServicer_to_server(
        DaemonServicer(_NoSnapshots(), stored, checks),  # type: ignore[arg-type]
        server,
    )
    address = str(tmp_path / "d.sock")
    server.add_insecure_port(f"unix:{address}")
    server.start()
    image = "reg:5000/team/app:1"
    try:
        with daemon_client.daemon_channel(address) as channel:
            stub = daemon_pb2_grpc.DaemonStub(channel)
            right = daemon_client.user_credentials_request(image, "alice", "right-pw")
            daemon_client.set_credentials(stub, address, right)
            wrong = daemon_client.user_credentials_request(image, "alice", "wrong-pw")
            with pytest.raises(errors.SnapshotterError) as caught:
                daemon_client.set_credentials(stub, address, wrong)
    finally:
        server.stop(None)
    assert str(caught.value) == f"{image}: AuthenticationError: manifest team/app:1 (HTTP 401)"
    assert checks.checked == [("reg:5000", "team/app")] * 2
    kept = trio.run(stored.credentials_for, "reg:5000", "team/app")
    assert kept == registry.Credentials("alice", "right-pw")
    assert trio.run(stored.credentials_for, "reg:5000", "team/other") is None


def test_password_stdin_reads_one_line_and_excludes_a_password_in_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io  # noqa: PLC0415

    monkeypatch.setenv("LAZYSNAP_REGISTRY_PASSWORD", "from-env")
    monkeypatch.setattr("sys.stdin", io.StringIO("pa ss:word\r\nsecond line\n"))
    args = argparse.Namespace(user="alice", password_stdin=True)
    assert pull.user_password(args) == ("alice", "pa ss:word")
    with pytest.raises(ValueError, match="exclude each other"):
        pull.user_password(argparse.Namespace(user="alice:pw", password_stdin=True))
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    with pytest.raises(ValueError, match="empty password"):
        pull.user_password(argparse.Namespace(user="alice", password_stdin=True))


def test_limits_are_the_registrys_own() -> None:
    assert MAX_CONFIG_BYTES == DEFAULT_MAX_FETCH == image_pull.MAX_CONFIG
    assert image_pull.MAX_DOCUMENT == MAX_MANIFEST_BYTES
    assert MAX_RESOLVE_RESPONSE_BYTES >= 2 * MAX_MANIFEST_BYTES + MAX_CONFIG_BYTES
    assert Path(DEFAULT_CONTAINERD_ADDRESS) == CLIENT_DEFAULT_ADDRESS


def test_the_user_password_is_asked_once_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(user="alice")
    monkeypatch.setenv("LAZYSNAP_REGISTRY_PASSWORD", "first")
    assert pull.user_password(args) == ("alice", "first")
    monkeypatch.setenv("LAZYSNAP_REGISTRY_PASSWORD", "second")
    assert pull.user_password(args) == ("alice", "first")
    assert pull.user_password(argparse.Namespace(user="bob:pw")) == ("bob", "pw")
    with pytest.raises(ValueError, match="user name"):
        pull.user_password(argparse.Namespace(user=":pw"))
