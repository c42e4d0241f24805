"""The ``lazysnap`` command line: a thin dispatcher over ``snapshotter.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

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
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module: ModuleType | None = None
    for name in COMMAND_MODULES:
        sp = sub.add_parser(name, help=COMMAND_HELP[name])
        if name == chosen:
            # Only the chosen command's module is imported and asked for its arguments.
            module = _load(name)
            module.add_arguments(sp)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(args_list)
    args = parser.parse_args(args_list)
    if module is None:
        parser.print_help()
        return 2
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
