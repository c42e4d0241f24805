"""The lazy side: a Prepare's labels become a layer served from its registry over FUSE.

Runs on the daemon's trio thread; ``bridge.TrioBridge`` is the gRPC threads' one way in. May
import ``store`` to implement its protocol and read its records, ``client`` for the pure
planning of an unpack and the image documents, the shared top-level modules, and the roots of
``fusefs`` and ``registry``; never ``daemon``, ``convert`` or ``commands``.
"""
