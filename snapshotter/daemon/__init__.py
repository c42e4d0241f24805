"""The daemon process: composition root (``main``), gRPC edge, configuration, the fuse keeper,
pushed credentials, the socket and systemd notification.

May import ``store``, ``remote``, ``client`` and the shared top-level modules; never
``convert`` or ``commands``. This ``__init__`` imports nothing, so that the fuse keeper, run as
``python -m snapshotter.daemon.keeper``, stays a small process.
"""
