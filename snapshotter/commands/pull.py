"""``lazysnap pull IMAGE``: fetch an image into containerd and unpack it into a snapshotter with
the per-layer labels containerd's CRI sends, so that lazysnap can serve layers lazily.

Registry hosts come from containerd's hosts.toml convention (``--hosts-dir``); loopback
registries (127.0.0.1, localhost, [::1]) are spoken to over plain HTTP, as containerd does.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable

import grpc
import trio

from registry import (
    CredentialProvider,
    Credentials,
    DockerConfigCredentials,
    NotFoundError,
    Reference,
    RegistryClient,
    RegistryError,
    StaticCredentials,
    host_platform,
    parse_platform,
    parse_reference,
)
from snapshotter._proto import daemon_pb2, daemon_pb2_grpc
from snapshotter.commands._containerd_args import (
    add_containerd_arguments,
    add_registry_arguments,
    fail,
    hosts_config,
    summary,
)
from snapshotter.containerd_client import ContainerdClient
from snapshotter.errors import SnapshotterError
from snapshotter.image_pull import ImageDocuments, pull
from snapshotter.logs import setup_logging
from snapshotter.progress import LayerResult, NoProgress, Progress, TextProgress
from snapshotter.unpacker import UnpackPlan

log = logging.getLogger(__name__)

NAME = "pull"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_containerd_arguments(parser)
    add_registry_arguments(parser)
    parser.add_argument(
        "--snapshotter-address", metavar="SOCK",
        help="the lazysnap daemon's socket: checked first, told which layers come so it reads "
        "their TOCs while containerd stores the image, and given the registry credentials "
        "this pull uses so it can fetch the lazy layers (kept in its memory only)",
    )
    parser.add_argument(
        "--user", metavar="USER[:PASSWORD]",
        help="registry credentials (default: the docker config); without :PASSWORD it is read "
        "from $LAZYSNAP_REGISTRY_PASSWORD or asked on the terminal",
    )


def _check_daemon(address: str) -> None:
    try:
        with grpc.insecure_channel(f"unix:{address}") as channel:
            daemon_pb2_grpc.DaemonStub(channel).Status(daemon_pb2.StatusRequest(), timeout=5)
    except grpc.RpcError as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise SnapshotterError(f"lazysnap daemon at {address} does not answer: {detail}") from exc


def _user_credentials(user: str) -> Credentials:
    name, sep, password = user.partition(":")
    if not name:
        raise ValueError("--user needs a user name")
    if not sep:
        password = os.environ.get("LAZYSNAP_REGISTRY_PASSWORD", "")
        if not password and sys.stdin.isatty():
            password = getpass.getpass(f"password for {name}: ")
        if not password:
            raise ValueError("--user without :PASSWORD needs $LAZYSNAP_REGISTRY_PASSWORD or a tty")
    return Credentials(username=name, password=password)


def _credentials(args: argparse.Namespace, reference: Reference) -> CredentialProvider:
    if args.user:
        return StaticCredentials({reference.domain: _user_credentials(args.user)})
    return DockerConfigCredentials()


def _hand_credentials_to_daemon(address: str, host: str, credentials: Credentials) -> None:
    """The daemon fetches the lazy layers itself, later, with its own registry client."""
    secret = credentials.password or credentials.identity_token
    request = daemon_pb2.SetCredentialsRequest(
        host=host, username=credentials.username if credentials.password else "", secret=secret
    )
    try:
        with grpc.insecure_channel(f"unix:{address}") as channel:
            daemon_pb2_grpc.DaemonStub(channel).SetCredentials(request, timeout=5)
    except grpc.RpcError as exc:
        detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise SnapshotterError(
            f"lazysnap daemon at {address} did not take the credentials: {detail}"
        ) from exc


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
                daemon_pb2_grpc.DaemonStub(channel).PrepareAhead(request, timeout=5)
        except grpc.RpcError as exc:
            log.debug("prepare-ahead not taken: %s", exc.code() if isinstance(exc, grpc.Call)
                      else exc)

    return announce


async def _pull(
    args: argparse.Namespace, client: ContainerdClient, progress: Progress
) -> tuple[ImageDocuments, list[LayerResult]]:
    reference = parse_reference(args.image)
    platform = parse_platform(args.platform) if args.platform else host_platform()
    provider = _credentials(args, reference)
    if args.snapshotter_address:
        found = await provider.credentials_for(reference.domain)
        if found is not None:
            await trio.to_thread.run_sync(
                _hand_credentials_to_daemon, args.snapshotter_address, reference.domain, found
            )
    async with RegistryClient(hosts_config(args), provider) as registry:
        announce = _announcer(args.snapshotter_address) if args.snapshotter_address else None
        return await pull(
            client, registry, reference, args.snapshotter, platform, progress, announce
        )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    progress: Progress = NoProgress() if args.quiet else TextProgress(sys.stdout)
    try:
        parse_reference(args.image)
        if args.platform:
            parse_platform(args.platform)
    except ValueError as exc:
        return fail(NAME, exc)
    try:
        if args.snapshotter_address:
            _check_daemon(args.snapshotter_address)
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
    if not args.quiet:
        print(summary(image.name, args.snapshotter, results))
    return 0
