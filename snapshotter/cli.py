"""The ``lazysnap`` command line: a thin dispatcher over ``snapshotter.commands``."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

# Sub-commands are imported lazily so that `lazysnap status` does not pay for FUSE or httpx.
COMMAND_MODULES: dict[str, str] = {
    "serve": "snapshotter.commands.serve",
    "status": "snapshotter.commands.status",
    "inspect": "snapshotter.commands.inspect",
    "mount": "snapshotter.commands.mount",
    "pull": "snapshotter.commands.pull",
    "unpack": "snapshotter.commands.unpack",
    "convert": "snapshotter.commands.convert",
    "index": "snapshotter.commands.index",
    "trace": "snapshotter.commands.trace",
}

COMMAND_HELP: dict[str, str] = {
    "serve": "run the snapshotter daemon (containerd proxy plugin)",
    "status": "check that the daemon answers on its socket",
    "inspect": "show an image's manifest and whether its layers can be pulled lazily",
    "mount": "mount a seekable layer blob or an image read-only over FUSE",
    "pull": "pull an image into containerd and unpack it into lazysnap with CRI's layer labels",
    "unpack": "unpack an image containerd already has into lazysnap with CRI's layer labels",
    "convert": "rewrite an image's layers as eStargz or zstd:chunked and push it",
    "index": "build zTOCs for an image's gzip layers and push a SOCI index (layers untouched)",
    "trace": "record first reads and registry ranges, and plot a recording",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMAND_MODULES[name])


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    parser = argparse.ArgumentParser(prog="lazysnap", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # A command named first needs no other command's parser: each costs about a millisecond
    # (argparse looks up its messages' translations), before `lazysnap pull` sends its first
    # RPC. Without one (`lazysnap`, `lazysnap --help`, a typo) all are there to be listed.
    chosen = argv[0] if argv and argv[0] in COMMAND_MODULES else None
    module: ModuleType | None = None
    for name in [chosen] if chosen else COMMAND_MODULES:
        sp = sub.add_parser(name, help=COMMAND_HELP[name])
        if name == chosen:
            # Only the chosen command's module is imported and asked for its arguments.
            module = _load(name)
            module.add_arguments(sp)
    return parser, module


def _run(argv: Sequence[str] | None) -> tuple[int, ModuleType | None]:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(args_list)
    args = parser.parse_args(args_list)
    if module is None:
        parser.print_help()
        return 2, None
    result: int = module.run(args)
    return result, module


def main(argv: Sequence[str] | None = None) -> int:
    return _run(argv)[0]


def entry() -> NoReturn:
    """The ``lazysnap`` program: ``main``, then, for a command whose module sets
    ``EXIT_PROMPTLY``, ``exit_promptly``."""
    code, module = _run(None)
    if getattr(module, "EXIT_PROMPTLY", False):
        exit_promptly(code)
    sys.exit(code)


def _other_threads_working() -> bool:
    main_thread = threading.main_thread()
    return any(t is not main_thread and not t.daemon and t.is_alive()
               for t in threading.enumerate())


def exit_promptly(code: int) -> NoReturn:
    """End a short-lived command's process now that its work is done.

    The interpreter's own exit frees every module and object first: after ``lazysnap pull``,
    with grpc's core, asyncio and protobuf loaded, that took a median 0.09-0.13 s on the
    loaded 2-core test machine (benchmarks/README.md), longer than the pull's last RPCs.
    Nothing in it is needed once the command returned: the atexit handlers
    (``logging.shutdown`` among them) run here, stdout and stderr are flushed here, and every
    gRPC call has been answered and its channel closed by the command. A non-daemon
    thread still running (work the interpreter would wait for), or output that cannot be
    flushed (which the interpreter reports, with exit status 120), gets the ordinary exit.
    """
    if _other_threads_working():
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
