"""Running one kubelet credential provider plugin: a ``CredentialProviderRequest`` on its stdin,
a ``CredentialProviderResponse`` read from its stdout, as kubelet does.

The plugin runs with the daemon's environment plus the ``env`` of its configuration (which wins),
and the ``args`` of its configuration. It gets a bounded time; past it, its whole process group
is killed. Its answer is checked as strictly as kubelet checks it. No error message quotes
the plugin's output or stderr: either may hold the secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from registry import Credentials
from snapshotter.daemon.kubelet_provider_config import ProviderConfig, parse_go_duration

DEFAULT_TIMEOUT_SECONDS = 20.0
MAX_OUTPUT_BYTES = 1024 * 1024
CACHE_KEY_TYPES = frozenset({"Image", "Registry", "Global"})
_RESPONSE_FIELDS = frozenset({"apiVersion", "kind", "cacheKeyType", "cacheDuration", "auth"})


class ProviderFailed(Exception):
    """The plugin could not be run or gave no usable answer; the message holds no secret."""


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    cache_key_type: str
    cache_duration: float | None  # seconds; None: the provider's defaultCacheDuration
    auth: Mapping[str, Credentials] = field(repr=False)


def request_body(provider: ProviderConfig, image: str) -> bytes:
    return json.dumps({"apiVersion": provider.api_version, "kind": "CredentialProviderRequest",
                       "image": image}).encode()


def _auth(value: Any) -> dict[str, Credentials]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ProviderFailed("its answer's auth is not an object")
    found: dict[str, Credentials] = {}
    for key, entry in value.items():
        if (not isinstance(key, str) or not isinstance(entry, Mapping)
                or set(entry) - {"username", "password"}
                or not all(isinstance(entry.get(f, ""), str) for f in ("username", "password"))):
            raise ProviderFailed("its answer's auth entries are not {username, password}")
        found[key] = Credentials(username=entry.get("username", ""),
                                 password=entry.get("password", ""))
    return found


def parse_response(provider: ProviderConfig, output: bytes) -> ProviderResponse:
    """The plugin's answer, refused unless it is a response in the provider's API version."""
    try:
        document: Any = json.loads(output)
    except (ValueError, RecursionError):
        raise ProviderFailed("it answered something that is not JSON") from None
    if not isinstance(document, Mapping):
        raise ProviderFailed("its answer is not a JSON object")
    if document.get("apiVersion") != provider.api_version:
        raise ProviderFailed(f"its answer's apiVersion is not {provider.api_version}")
    if document.get("kind") != "CredentialProviderResponse":
        raise ProviderFailed("its answer's kind is not CredentialProviderResponse")
    unknown = sorted(str(k)[:40] for k in set(document) - _RESPONSE_FIELDS)
    if unknown:
        raise ProviderFailed(f"its answer has unknown fields {', '.join(unknown)}")
    key_type = document.get("cacheKeyType")
    if key_type not in CACHE_KEY_TYPES:
        raise ProviderFailed("its answer's cacheKeyType is not Image, Registry or Global")
    duration = document.get("cacheDuration")
    seconds = None
    if duration is not None:
        try:
            seconds = parse_go_duration(duration) if isinstance(duration, str) else None
        except ValueError:
            seconds = None
        if seconds is None or seconds < 0:
            raise ProviderFailed("its answer's cacheDuration is not a duration such as 5m")
    return ProviderResponse(str(key_type), seconds, _auth(document.get("auth")))


def plugin_environment(provider: ProviderConfig) -> dict[str, str]:
    return {**os.environ, **dict(provider.env)}


async def _read_capped(stream: anyio.abc.ByteReceiveStream | None) -> bytes:
    data = bytearray()
    if stream is None:
        return b""
    with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                             anyio.BrokenResourceError):
        while len(data) <= MAX_OUTPUT_BYTES:
            data += await stream.receive()
    return bytes(data)


def _kill_group(process: anyio.abc.Process) -> None:
    # The plugin's own children may hold its stdout open: the whole group goes.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def run_provider(
    provider: ProviderConfig, bin_dir: Path, image: str,
    time_limit: float = DEFAULT_TIMEOUT_SECONDS,
) -> ProviderResponse:
    """Run the plugin for ``image`` and read its answer, within ``time_limit`` seconds."""
    program = bin_dir / provider.name
    try:
        process = await anyio.open_process(
            [str(program), *provider.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=plugin_environment(provider), start_new_session=True,
        )
    except OSError as exc:
        raise ProviderFailed(f"cannot run {program}: {exc.strerror or type(exc).__name__}"
                             ) from None
    outputs: dict[str, bytes] = {}
    try:
        with anyio.fail_after(time_limit):
            async with anyio.create_task_group() as group:

                async def collect(name: str, stream: anyio.abc.ByteReceiveStream | None) -> None:
                    outputs[name] = await _read_capped(stream)
                    if len(outputs[name]) > MAX_OUTPUT_BYTES:
                        group.cancel_scope.cancel()  # it would block writing the rest

                group.start_soon(collect, "stdout", process.stdout)
                group.start_soon(collect, "stderr", process.stderr)
                if process.stdin is not None:
                    with contextlib.suppress(anyio.BrokenResourceError,
                                             anyio.ClosedResourceError):
                        await process.stdin.send(request_body(provider, image))
                    await process.stdin.aclose()
            if any(len(data) > MAX_OUTPUT_BYTES for data in outputs.values()):
                raise ProviderFailed(f"it printed more than {MAX_OUTPUT_BYTES} bytes")
            code = await process.wait()
    except TimeoutError:
        raise ProviderFailed(f"it did not answer within {time_limit:g}s and was killed") from None
    finally:
        if process.returncode is None:
            _kill_group(process)
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()
    if code != 0:
        # Its stderr may quote the secret it failed to use: only its size is told.
        raise ProviderFailed(f"it exited with status {code} "
                             f"({len(outputs.get('stderr', b''))} bytes on stderr)")
    return parse_response(provider, outputs.get("stdout", b""))
