"""``lazysnap pull IMAGE``: fetch an image into containerd and unpack it into a snapshotter with
the per-layer labels containerd's CRI sends, so that lazysnap can serve layers lazily.

Registry hosts come from containerd's hosts.toml convention (``--hosts-dir``); loopback
registries (127.0.0.1, localhost, [::1]) are spoken to over plain HTTP, as containerd does.

With ``--snapshotter-address`` the daemon resolves the image (``Daemon/Resolve``) with its own,
already connected registry client and starts reading the lazy layers' TOCs at once. Most of a
local resolution's cost is this process's start-up (trio, httpx, TLS set-up), so in that mode
nothing of ``registry``, trio or protobuf is imported, and no configuration read, before the
Resolve RPC is sent (``client.resolve_send``: grpc alone); the daemon's Status is asked only
when the Resolve failed. The imports the unpack needs (``client.daemon_client`` and its
protobuf module first) happen while the daemon talks to the registry; httpx, trio and a
registry client come only if a layer's blob must be fetched (a layer that is not lazy).

The process ends with ``os._exit`` once its output is flushed (``EXIT_PROMPTLY``, see
``snapshotter.cli``): tearing down an interpreter that loaded grpc, asyncio and protobuf took
longer than the pull's last three RPCs.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from snapshotter.client.progress import LayerResult, Progress, layer_progress
from snapshotter.client.resolve_send import DaemonCannotResolve, daemon_channel, send_resolve
from snapshotter.commands._containerd_args import (
    add_containerd_arguments,
    add_registry_arguments,
    fail,
    hosts_config,
    summary,
)
from snapshotter.errors import SnapshotterError
from snapshotter.logs import setup_logging

if TYPE_CHECKING:
    from registry import CredentialProvider, Reference
    from snapshotter.client.containerd_client import ContainerdClient
    from snapshotter.client.documents import ImageDocuments
    from snapshotter.client.fetch_settings import FetchSettings
    from snapshotter.client.registry_blobs import ClientSetup
    from snapshotter.daemon_api import ResolveAnswer

log = logging.getLogger(__name__)

NAME = "pull"
# snapshotter.cli ends the process with os._exit once run() returned and the output is flushed.
EXIT_PROMPTLY = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_containerd_arguments(parser)
    add_registry_arguments(parser)
    parser.add_argument(
        "--snapshotter-address", metavar="SOCK",
        help="the lazysnap daemon's socket: it resolves the image with its own "
        "registry client and reads the lazy layers' TOCs while containerd stores the image; "
        "--user credentials are handed to it (kept in its memory only)",
    )
    parser.add_argument(
        "--user", metavar="USER[:PASSWORD]",
        help="registry credentials (default: the docker config); without :PASSWORD it is read "
        "from --password-stdin, $LAZYSNAP_REGISTRY_PASSWORD or asked on the terminal. A "
        ":PASSWORD here is visible to every user of the machine (ps, /proc): prefer those",
    )
    parser.add_argument(
        "--parallel", action=argparse.BooleanOptionalAction, default=None,
        help="download the layers that are not lazy in ranges over several connections and "
        "unpack them while they arrive (default: [pull] parallel in --config, on)",
    )
    parser.add_argument(
        "--config", type=Path, metavar="TOML",
        help="lazysnap's configuration file, for its [pull] table "
        "(default /etc/lazysnap/config.toml when it exists)",
    )
    parser.add_argument(
        "--password-stdin", action="store_true",
        help="read --user's password from standard input (its first line), as docker login does",
    )


def user_password(args: argparse.Namespace) -> tuple[str, str]:
    """``--user`` as (name, password). Asked on the terminal at most once per run: the daemon
    path needs it for SetCredentials and again if a blob must be fetched here."""
    known: tuple[str, str] | None = getattr(args, "user_password", None)
    if known is not None:
        return known
    name, sep, password = args.user.partition(":")
    if not name:
        raise ValueError("--user needs a user name")
    if getattr(args, "password_stdin", False):
        if sep:
            raise ValueError("--password-stdin and a :PASSWORD in --user exclude each other")
        password = _first_line(sys.stdin)
        if not password:
            raise ValueError("--password-stdin read an empty password")
    elif not sep:
        password = os.environ.get("LAZYSNAP_REGISTRY_PASSWORD", "")
        if not password and sys.stdin.isatty():
            password = getpass.getpass(f"password for {name}: ")
        if not password:
            raise ValueError("--user without :PASSWORD needs $LAZYSNAP_REGISTRY_PASSWORD or a tty")
    args.user_password = (name, password)
    return name, password


def _first_line(stream: TextIO) -> str:
    # As docker login: the password is the input without its line ending.
    return stream.readline().rstrip("\r\n")


def _credentials(args: argparse.Namespace, reference: Reference) -> CredentialProvider:
    from registry import Credentials, DockerConfigCredentials, StaticCredentials  # noqa: PLC0415

    if args.user:
        name, password = user_password(args)
        return StaticCredentials(
            {reference.domain: Credentials(username=name, password=password)}
        )
    return DockerConfigCredentials()


def parallel_settings(args: argparse.Namespace) -> FetchSettings | None:
    """How to pull the layers that are not lazy: ``--parallel`` or the config's [pull] table;
    None for containerd's way."""
    from snapshotter.client.fetch_settings import FetchSettings  # noqa: PLC0415
    from snapshotter.daemon.config import load_config  # noqa: PLC0415

    pull = load_config(args.config).pull
    enabled = pull.parallel if args.parallel is None else args.parallel
    if not enabled:
        return None
    return FetchSettings(connections=pull.connections, range_size=pull.range_size)


def _parallel(args: argparse.Namespace) -> FetchSettings | None:
    """``parallel_settings``, read once per run; an invalid configuration is a SnapshotterError.
    Read after the Resolve request is out: the daemon works while this process reads it."""
    if not hasattr(args, "parallel_settings"):
        from snapshotter.daemon.config import ConfigError  # noqa: PLC0415

        try:
            args.parallel_settings = parallel_settings(args)
        except ConfigError as exc:
            raise SnapshotterError(str(exc)) from exc
    settings: FetchSettings | None = args.parallel_settings
    return settings


def _client_setup(args: argparse.Namespace) -> ClientSetup:
    return lambda reference: (hosts_config(args), _credentials(args, reference))


def _pull_through_daemon(args: argparse.Namespace, progress: Progress) -> int:
    address = args.snapshotter_address
    try:
        with daemon_channel(address) as channel:
            if args.user:
                # The daemon must answer, and take the credentials, before the Resolve.
                from snapshotter.client.daemon_client import (  # noqa: PLC0415
                    hand_user_credentials,
                )

                hand_user_credentials(channel, address, args.image,
                                      functools.partial(user_password, args))
            log.debug("resolve through the daemon image=%s", args.image)
            pending = send_resolve(channel, args.image, args.platform)
            # Only now the generated protobuf module and the rest of the client.
            from snapshotter.client.daemon_client import (  # noqa: PLC0415 (module docstring)
                check_daemon,
                daemon_stub_on,
                hand_docker_config_credentials,
                parse_resolve_reply,
                receive_answer,
                resolve_request,
            )

            stub = daemon_stub_on(channel)
            resolve = resolve_request(args.image, args.platform)

            def hand_credentials() -> bool:
                # --user was handed over already; otherwise the caller's docker config may help.
                return not args.user and hand_docker_config_credentials(stub, address, args.image)

            def answer() -> ResolveAnswer:
                try:
                    return receive_answer(
                        stub, address, resolve,
                        lambda: parse_resolve_reply(pending.result(), address),
                        hand_credentials,
                    )
                except SnapshotterError:
                    # Status only now: a pull that works needs no round trip more, one that
                    # failed says so when the daemon is not there at all.
                    if not args.user:
                        check_daemon(stub, address)
                    raise

            try:
                return _unpack_resolved(args, progress, answer)
            finally:
                pending.cancel()
    except DaemonCannotResolve:
        log.info("daemon at %s cannot resolve; resolving here", address)
        return _pull_locally(args, progress)
    except (SnapshotterError, ValueError) as exc:
        return fail(NAME, exc)
    except KeyboardInterrupt:
        fail(NAME, "interrupted (containerd collects what was stored once its lease expires)")
        return 130


def _unpack_resolved(
    args: argparse.Namespace, progress: Progress, answer: Callable[[], ResolveAnswer]
) -> int:
    # Meanwhile the daemon talks to the registry: import what the unpack needs, reach containerd.
    from registry import NotFoundError, RegistryError  # noqa: PLC0415 (module docstring)
    from snapshotter.client.containerd_client import ContainerdClient  # noqa: PLC0415
    from snapshotter.client.direct_apply import DirectApplier  # noqa: PLC0415
    from snapshotter.client.documents import documents_from_answer  # noqa: PLC0415
    from snapshotter.client.pull import store_and_unpack  # noqa: PLC0415
    from snapshotter.client.registry_blobs import OnDemandRegistryBlobs  # noqa: PLC0415
    from snapshotter.client.soci_check import has_v2_index  # noqa: PLC0415

    try:
        with ContainerdClient(args.address, args.namespace) as client:
            client.version()  # containerd's absence is reported before any registry error
            parallel = _parallel(args)
            resolved = answer()
            image = documents_from_answer(resolved)
            log.info("resolved by the daemon image=%s manifest=%s read_ahead=%d",
                     image.name, image.manifest_digest, len(resolved.read_ahead))
            blobs = OnDemandRegistryBlobs(image.name, _client_setup(args), parallel)
            # A v2 index is known from the manifest; a v1 index is looked up only when a
            # gzip layer would be downloaded ahead, with the client that download needs.
            direct = None if parallel is None else DirectApplier(
                client, blobs, progress,
                soci_indexed=has_v2_index(image) or functools.partial(blobs.soci_indexed, image),
            )
            try:
                results = store_and_unpack(
                    client, image, args.snapshotter, blobs, progress, direct=direct
                )
            finally:
                blobs.close()
    except NotFoundError as exc:
        return fail(NAME, f"{args.image}: not found in the registry: {exc}")
    except RegistryError as exc:
        return fail(NAME, f"{args.image}: {type(exc).__name__}: {exc}")
    _tell_daemon_pulled(args, image, results)
    return _done(args, image.name, results)


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
    from snapshotter.client.daemon_client import (  # noqa: PLC0415
        announcer,
        credentials_request,
        send_credentials,
    )
    from snapshotter.client.pull import pull  # noqa: PLC0415

    reference = parse_reference(args.image)
    platform = parse_platform(args.platform) if args.platform else host_platform()
    provider = _credentials(args, reference)
    if args.snapshotter_address:
        # A daemon that cannot resolve (see DaemonCannotResolve) still takes credentials.
        found = await provider.credentials_for(reference.domain)
        if found is not None:
            request = credentials_request(found, args.image)
            await trio.to_thread.run_sync(send_credentials, args.snapshotter_address, request)
    async with RegistryClient(hosts_config(args), provider) as registry:
        announce = announcer(args.snapshotter_address) if args.snapshotter_address else None
        return await pull(
            client, registry, reference, args.snapshotter, platform, progress, announce,
            _parallel(args),
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
        _parallel(args)
    except (SnapshotterError, ValueError) as exc:
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
    _tell_daemon_pulled(args, image, results)
    return _done(args, image.name, results)


def _tell_daemon_pulled(
    args: argparse.Namespace, image: ImageDocuments, results: list[LayerResult]
) -> None:
    """A gzip image pulled in full: the daemon may build and publish its SOCI index."""
    from snapshotter.client.daemon_client import tell_image_pulled  # noqa: PLC0415
    from snapshotter.client.soci_check import pulled_gzip_in_full  # noqa: PLC0415

    if args.snapshotter_address and pulled_gzip_in_full(image, results):
        tell_image_pulled(args.snapshotter_address, image.name, image.manifest_digest,
                          args.namespace)


def _done(args: argparse.Namespace, name: str, results: list[LayerResult]) -> int:
    if not args.quiet:
        print(summary(name, args.snapshotter, results))
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    if args.password_stdin and not args.user:
        return fail(NAME, "--password-stdin needs --user USER")
    progress = layer_progress(sys.stdout, quiet=args.quiet)
    try:
        if args.snapshotter_address:
            return _pull_through_daemon(args, progress)
        return _pull_locally(args, progress)
    finally:
        progress.close()
