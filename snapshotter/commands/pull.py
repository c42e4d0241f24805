"""``lazysnap pull IMAGE``: fetch an image into containerd and unpack it into a snapshotter with
the per-layer labels containerd's CRI sends, so that lazysnap can serve layers lazily.

Registry hosts come from containerd's hosts.toml convention (``--hosts-dir``); loopback
registries (127.0.0.1, localhost, [::1]) are spoken to over plain HTTP, as containerd does.

With ``--snapshotter-address`` the daemon resolves the image (``Daemon/Resolve``) with its own,
already connected registry client and starts reading the lazy layers' TOCs at once. Most of a
local resolution's cost is this process's start-up (trio, httpx, TLS set-up), so in that mode
nothing of ``registry`` or trio is imported before the Resolve RPC is sent; the imports the
unpack needs happen while the daemon talks to the registry, and a registry client is started
only if a layer's blob must be fetched (a layer that is not lazy).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.client.progress import LayerResult, NoProgress, Progress, TextProgress
from snapshotter.commands._containerd_args import (
    add_containerd_arguments,
    add_registry_arguments,
    fail,
    hosts_config,
    summary,
)
from snapshotter.daemon_api import (
    MAX_RESOLVE_REQUEST_BYTES,
    MAX_RESOLVE_RESPONSE_BYTES,
    RESOLVE_RPC_TIMEOUT_SECONDS,
    ResolvedImage,
)
from snapshotter.errors import SnapshotterError
from snapshotter.logs import setup_logging

if TYPE_CHECKING:
    import trio

    from registry import CredentialProvider, Credentials, Descriptor, Reference
    from snapshotter.client.containerd_client import ContainerdClient
    from snapshotter.client.pull import ImageDocuments, RegistryBlobs
    from snapshotter.client.unpacker import UnpackPlan

log = logging.getLogger(__name__)

NAME = "pull"
DAEMON_RPC_TIMEOUT = 5.0  # Status, SetCredentials, PrepareAhead: answered from memory

# What the daemon's Resolve puts before a registry failure's text (``ResolveError``): the
# registry error's type name, as a local resolution prints it.
_REGISTRY_ERROR_TEXT = re.compile(r"^[A-Z][A-Za-z]*Error: ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_containerd_arguments(parser)
    add_registry_arguments(parser)
    parser.add_argument(
        "--snapshotter-address", metavar="SOCK",
        help="the lazysnap daemon's socket: checked first, resolves the image with its own "
        "registry client and reads the lazy layers' TOCs while containerd stores the image; "
        "--user credentials are handed to it (kept in its memory only)",
    )
    parser.add_argument(
        "--user", metavar="USER[:PASSWORD]",
        help="registry credentials (default: the docker config); without :PASSWORD it is read "
        "from $LAZYSNAP_REGISTRY_PASSWORD or asked on the terminal",
    )


def _rpc_detail(exc: grpc.RpcError) -> str:
    return (exc.details() or "") if isinstance(exc, grpc.Call) else str(exc)


def _check_daemon(stub: daemon_pb2_grpc.DaemonStub, address: str) -> None:
    try:
        stub.Status(daemon_pb2.StatusRequest(), timeout=DAEMON_RPC_TIMEOUT)
    except grpc.RpcError as exc:
        raise SnapshotterError(
            f"lazysnap daemon at {address} does not answer: {_rpc_detail(exc)}"
        ) from exc


def user_password(args: argparse.Namespace) -> tuple[str, str]:
    """``--user`` as (name, password). Asked on the terminal at most once per run: the daemon
    path needs it for SetCredentials and again if a blob must be fetched here."""
    known: tuple[str, str] | None = getattr(args, "user_password", None)
    if known is not None:
        return known
    name, sep, password = args.user.partition(":")
    if not name:
        raise ValueError("--user needs a user name")
    if not sep:
        password = os.environ.get("LAZYSNAP_REGISTRY_PASSWORD", "")
        if not password and sys.stdin.isatty():
            password = getpass.getpass(f"password for {name}: ")
        if not password:
            raise ValueError("--user without :PASSWORD needs $LAZYSNAP_REGISTRY_PASSWORD or a tty")
    args.user_password = (name, password)
    return name, password


def _credentials(args: argparse.Namespace, reference: Reference) -> CredentialProvider:
    from registry import Credentials, DockerConfigCredentials, StaticCredentials  # noqa: PLC0415

    if args.user:
        name, password = user_password(args)
        return StaticCredentials(
            {reference.domain: Credentials(username=name, password=password)}
        )
    return DockerConfigCredentials()


def credentials_request(
    credentials: Credentials, *, host: str = "", image: str = ""
) -> daemon_pb2.SetCredentialsRequest:
    """For ``host``, or for the registry of ``image`` (the daemon parses the reference)."""
    secret = credentials.password or credentials.identity_token
    return daemon_pb2.SetCredentialsRequest(
        host=host, image=image,
        username=credentials.username if credentials.password else "", secret=secret,
    )


def _set_credentials(
    stub: daemon_pb2_grpc.DaemonStub, address: str, request: daemon_pb2.SetCredentialsRequest
) -> None:
    """The daemon fetches the lazy layers itself, later, with its own registry client."""
    try:
        stub.SetCredentials(request, timeout=DAEMON_RPC_TIMEOUT)
    except grpc.RpcError as exc:
        if request.image and isinstance(exc, grpc.Call) and (
            exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        ):
            # The daemon could not parse the image reference: the message a local pull prints.
            raise SnapshotterError(_rpc_detail(exc)) from exc
        # The details are the daemon's validation message; it never repeats the secret.
        raise SnapshotterError(
            f"lazysnap daemon at {address} did not take the credentials: {_rpc_detail(exc)}"
        ) from exc


def _daemon_channel(address: str) -> grpc.Channel:
    """The one channel to the daemon: Status, SetCredentials and Resolve share its connection.
    A Resolve answer carries at most an index, a manifest and a config."""
    return grpc.insecure_channel(
        f"unix:{address}",
        options=[
            ("grpc.max_receive_message_length", MAX_RESOLVE_RESPONSE_BYTES),
            ("grpc.max_send_message_length", MAX_RESOLVE_REQUEST_BYTES),
        ],
    )


# -- Resolve: request and answer ------------------------------------------------------------


def resolve_request(image: str, platform: str | None) -> daemon_pb2.ResolveRequest:
    return daemon_pb2.ResolveRequest(image=image, platform=platform or "")


def resolved_from_proto(reply: daemon_pb2.ResolveResponse) -> ResolvedImage:
    """Without an index the daemon sends the manifest once, as the target."""
    has_index = reply.manifest_digest != reply.target_digest
    return ResolvedImage(
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


def resolve_failure(image: str, address: str, code: grpc.StatusCode, detail: str) -> str | None:
    """The one-line message a local resolution would print for the daemon's error (see the
    daemon's error table in grpc_service), or None when this daemon cannot resolve at all."""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return None  # an older daemon, or lazy pulling disabled: resolve here
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{image}: not found in the registry: {detail}"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return detail
    if _REGISTRY_ERROR_TEXT.match(detail):
        return f"{image}: {detail}"  # the daemon's registry failure, named like a local one
    # The call itself failed (the daemon went away, or our deadline passed).
    return f"lazysnap daemon at {address} could not resolve {image}: {code.name}: {detail}"


class _DaemonCannotResolve(Exception):
    pass


def _resolve(
    stub: daemon_pb2_grpc.DaemonStub,
    args: argparse.Namespace,
    call: Callable[[], daemon_pb2.ResolveResponse],
) -> ResolvedImage:
    address = args.snapshotter_address
    try:
        return resolved_from_proto(call())
    except grpc.RpcError as first:
        code = first.code() if isinstance(first, grpc.Call) else grpc.StatusCode.UNKNOWN
        failure = first
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and (
            not args.user and _hand_docker_config_credentials(stub, args)
        ):
            try:
                return resolved_from_proto(stub.Resolve(
                    resolve_request(args.image, args.platform),
                    timeout=RESOLVE_RPC_TIMEOUT_SECONDS,
                ))
            except grpc.RpcError as second:
                failure = second
                code = second.code() if isinstance(second, grpc.Call) else code
    message = resolve_failure(args.image, address, code, _rpc_detail(failure))
    if message is None:
        raise _DaemonCannotResolve()
    raise SnapshotterError(message)


def _hand_docker_config_credentials(
    stub: daemon_pb2_grpc.DaemonStub, args: argparse.Namespace
) -> bool:
    """The daemon's docker config had nothing for this registry: hand it the caller's, as a
    local pull would have used them. True if there were any."""
    import trio  # noqa: PLC0415 (only on this rare path)

    from registry import DockerConfigCredentials, parse_reference  # noqa: PLC0415

    domain = parse_reference(args.image).domain
    found = trio.run(DockerConfigCredentials().credentials_for, domain)
    if found is None:
        return False
    log.info("registry credentials from the docker config handed over host=%s", domain)
    _set_credentials(stub, args.snapshotter_address, credentials_request(found, host=domain))
    return True


# -- blobs of layers that are not lazy ------------------------------------------------------


class OnDemandRegistryBlobs:
    """A ``BlobSource`` whose registry client (trio loop in its own thread, TLS context, auth) is
    started at the first blob that must be fetched: an image whose layers are all lazy never
    pays for it. The unpack runs in the main thread and hops into that loop by its token."""

    def __init__(self, args: argparse.Namespace, image_name: str) -> None:
        self._args = args
        self._image_name = image_name
        self._blobs: RegistryBlobs | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._failure: BaseException | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    @contextlib.contextmanager
    def open(self, layer: Descriptor) -> Iterator[Iterable[bytes]]:
        if self._blobs is None:
            self._blobs = self._start()
        with self._blobs.open(layer) as chunks:
            yield chunks

    def _start(self) -> RegistryBlobs:
        import trio  # noqa: PLC0415 (see the class docstring)

        from registry import RegistryClient, parse_reference  # noqa: PLC0415
        from snapshotter.client.pull import RegistryBlobs  # noqa: PLC0415

        ref = parse_reference(self._image_name)
        provider = _credentials(self._args, ref)
        hosts = hosts_config(self._args)
        self._scratch = tempfile.TemporaryDirectory(prefix="lazysnap-pull-")
        scratch = Path(self._scratch.name)
        started: list[RegistryBlobs] = []
        ready = threading.Event()

        async def serve() -> None:
            async with RegistryClient(hosts, provider) as client:
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                started.append(RegistryBlobs(client, ref, scratch, trio_token=self._token))
                ready.set()
                await self._stop.wait()

        def main() -> None:
            try:
                trio.run(serve)
            except BaseException as exc:  # reported to the unpack, in the main thread
                self._failure = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=main, name="lazysnap-pull-registry", daemon=True)
        self._thread.start()
        ready.wait()
        if not started:
            raise self._failure or SnapshotterError("the registry client did not start")
        return started[0]

    def close(self) -> None:
        if self._thread is not None:
            if self._token is not None and self._stop is not None:
                import trio  # noqa: PLC0415 (already imported by _start)

                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join()
        if self._scratch is not None:
            self._scratch.cleanup()


# -- the two ways -----------------------------------------------------------------------------


def _pull_through_daemon(args: argparse.Namespace, progress: Progress) -> int:
    address = args.snapshotter_address
    try:
        with _daemon_channel(address) as channel:
            stub = daemon_pb2_grpc.DaemonStub(channel)
            _check_daemon(stub, address)
            if args.user:
                name, password = user_password(args)
                request = daemon_pb2.SetCredentialsRequest(
                    image=args.image, username=name, secret=password
                )
                _set_credentials(stub, address, request)
            log.debug("resolve through the daemon image=%s", args.image)
            pending = stub.Resolve.future(
                resolve_request(args.image, args.platform), timeout=RESOLVE_RPC_TIMEOUT_SECONDS
            )
            try:
                return _unpack_resolved(args, progress, stub, pending.result)
            finally:
                pending.cancel()
    except _DaemonCannotResolve:
        log.info("daemon at %s cannot resolve; resolving here", address)
        return _pull_locally(args, progress)
    except (SnapshotterError, ValueError) as exc:
        return fail(NAME, exc)
    except KeyboardInterrupt:
        fail(NAME, "interrupted (containerd collects what was stored once its lease expires)")
        return 130


def _unpack_resolved(
    args: argparse.Namespace,
    progress: Progress,
    stub: daemon_pb2_grpc.DaemonStub,
    answer: Callable[[], daemon_pb2.ResolveResponse],
) -> int:
    # Meanwhile the daemon talks to the registry: import what the unpack needs, reach containerd.
    from registry import NotFoundError, RegistryError  # noqa: PLC0415 (module docstring)
    from snapshotter.client.containerd_client import ContainerdClient  # noqa: PLC0415
    from snapshotter.client.pull import documents_from_resolved, store_and_unpack  # noqa: PLC0415

    try:
        with ContainerdClient(args.address, args.namespace) as client:
            client.version()  # containerd's absence is reported before any registry error
            resolved = _resolve(stub, args, answer)
            image = documents_from_resolved(resolved)
            log.info("resolved by the daemon image=%s manifest=%s read_ahead=%d",
                     image.name, image.manifest_digest, len(resolved.read_ahead))
            blobs = OnDemandRegistryBlobs(args, image.name)
            try:
                results = store_and_unpack(client, image, args.snapshotter, blobs, progress)
            finally:
                blobs.close()
    except NotFoundError as exc:
        return fail(NAME, f"{args.image}: not found in the registry: {exc}")
    except RegistryError as exc:
        return fail(NAME, f"{args.image}: {type(exc).__name__}: {exc}")
    return _done(args, image.name, results)


def _announcer(address: str) -> Callable[[UnpackPlan], None]:
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


async def _pull(
    args: argparse.Namespace, client: ContainerdClient, progress: Progress
) -> tuple[ImageDocuments, list[LayerResult]]:
    import trio  # noqa: PLC0415 (module docstring)

    from registry import (  # noqa: PLC0415
        RegistryClient,
        host_platform,
        parse_platform,
        parse_reference,
    )
    from snapshotter.client.pull import pull  # noqa: PLC0415

    reference = parse_reference(args.image)
    platform = parse_platform(args.platform) if args.platform else host_platform()
    provider = _credentials(args, reference)
    if args.snapshotter_address:
        # A daemon that cannot resolve (see _DaemonCannotResolve) still takes credentials.
        found = await provider.credentials_for(reference.domain)
        if found is not None:
            request = credentials_request(found, host=reference.domain)

            def hand_over() -> None:
                with _daemon_channel(args.snapshotter_address) as channel:
                    stub = daemon_pb2_grpc.DaemonStub(channel)
                    _set_credentials(stub, args.snapshotter_address, request)

            await trio.to_thread.run_sync(hand_over)
    async with RegistryClient(hosts_config(args), provider) as registry:
        announce = _announcer(args.snapshotter_address) if args.snapshotter_address else None
        return await pull(
            client, registry, reference, args.snapshotter, platform, progress, announce
        )


def _pull_locally(args: argparse.Namespace, progress: Progress) -> int:
    """The registry client of this process resolves and fetches (no daemon, or one that cannot
    resolve)."""
    import trio  # noqa: PLC0415 (module docstring)

    from registry import (  # noqa: PLC0415
        NotFoundError,
        RegistryError,
        parse_platform,
        parse_reference,
    )
    from snapshotter.client.containerd_client import ContainerdClient  # noqa: PLC0415

    try:
        parse_reference(args.image)
        if args.platform:
            parse_platform(args.platform)
    except ValueError as exc:
        return fail(NAME, exc)
    try:
        with ContainerdClient(args.address, args.namespace) as client:
            client.version()  # fail fast, before any download, when containerd is not there
            image, results = trio.run(_pull, args, client, progress)
    except NotFoundError as exc:
        return fail(NAME, f"{args.image}: not found in the registry: {exc}")
    except RegistryError as exc:
        return fail(NAME, f"{args.image}: {type(exc).__name__}: {exc}")
    except (SnapshotterError, ValueError) as exc:
        return fail(NAME, exc)
    except KeyboardInterrupt:
        fail(NAME, "interrupted (containerd collects what was stored once its lease expires)")
        return 130
    return _done(args, image.name, results)


def _done(args: argparse.Namespace, name: str, results: list[LayerResult]) -> int:
    if not args.quiet:
        print(summary(name, args.snapshotter, results))
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    progress: Progress = NoProgress() if args.quiet else TextProgress(sys.stdout)
    if args.snapshotter_address:
        return _pull_through_daemon(args, progress)
    return _pull_locally(args, progress)
