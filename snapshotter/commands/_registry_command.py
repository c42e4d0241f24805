"""How ``lazysnap convert`` and ``lazysnap index`` run: check the input, do the registry work
under trio, and turn each kind of error into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from registry import DockerConfigCredentials, NotFoundError, RegistryClient, RegistryError
from snapshotter.commands._containerd_args import fail, hosts_config

Options = TypeVar("Options")
Result = TypeVar("Result")

INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process stopped by SIGINT


@dataclass(frozen=True)
class RegistryCommand:
    name: str
    image: str  # the reference its error lines name
    error: type[Exception]  # the command's own failure
    unwritten: str  # the tag an interrupted run leaves as it was


def registry_client(args: argparse.Namespace) -> RegistryClient:
    """A client for ``--hosts-dir`` and ``--plain-http``, with the Docker config's credentials."""
    return RegistryClient(hosts_config(args), DockerConfigCredentials())


def run_registry_command(
    args: argparse.Namespace,
    command: RegistryCommand,
    prepare: Callable[[argparse.Namespace], Options],
    work: Callable[[argparse.Namespace, Options], Awaitable[Result]],
    done: Callable[[argparse.Namespace, Result], int],
) -> int:
    """``prepare`` checks the arguments (raising ``command.error`` or ``ValueError``), ``work``
    talks to the registry, ``done`` prints the result and gives the exit code."""
    try:
        options = prepare(args)
    except (command.error, ValueError) as exc:
        return fail(command.name, exc)
    try:
        result = trio.run(work, args, options)
    except NotFoundError as exc:
        return fail(command.name, f"{command.image}: not found in the registry: {exc}")
    except RegistryError as exc:
        return fail(command.name, f"{type(exc).__name__}: {exc}")
    except command.error as exc:
        return fail(command.name, f"{command.image}: {exc}")
    except KeyboardInterrupt:
        fail(command.name, f"interrupted ({command.unwritten} was not written)")
        return INTERRUPTED_EXIT_CODE
    return done(args, result)
