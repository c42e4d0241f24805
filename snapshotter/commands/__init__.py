"""Sub-commands of the ``lazysnap`` CLI, one module each.

Each module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""
