"""containerd's snapshot semantics: snapshots, metadata, filters, mounts, layout, disk usage.

May import the standard library and ``snapshotter.errors``, ``snapshotter.model`` and
``snapshotter.labels`` only: no trio, FUSE, registry or gRPC, and no other subpackage. Lazily
served layers are reached through ``RemoteLayers``, a protocol this package owns.
"""

from snapshotter.store.remote import AttachedLayer, RemoteLayerError, RemoteLayers
from snapshotter.store.snapshots import Snapshotter

__all__ = ["AttachedLayer", "RemoteLayerError", "RemoteLayers", "Snapshotter"]
