"""The lazy read-only filesystem: seekable layer formats, the FUSE session, the chunk cache.

Never imports ``registry`` or ``snapshotter``: what it needs from a blob is the ``BlobReader``
protocol, which the registry's blob reader satisfies structurally.
"""

__all__: list[str] = []
