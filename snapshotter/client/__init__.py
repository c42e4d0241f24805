"""The containerd client side: ``lazysnap pull`` and ``lazysnap unpack``.

Stores an image's documents in containerd, then unpacks its layers with labelled Prepares that
the snapshotter can serve lazily, whether it is this project's daemon or another.

- ``documents``: an image's documents, from the registry or from the daemon's Resolve answer;
- ``pull``: store and unpack (``pull``, ``unpack_existing``), layer blobs from the registry;
- ``unpacker``, ``chain``: the unpack plan, chain IDs and CRI's per-layer labels;
- ``containerd_api``, ``containerd_client``: containerd's content, images, leases, snapshots;
- ``daemon_client``, ``registry_blobs``: the lazysnap daemon's gRPC client, and the registry
  client started only for blobs that are not lazy;
- ``progress``: what the CLI prints per layer;
- the parallel pull: ``parallel_fetch`` downloads layers in ranges into ``spool`` files,
  ``direct_apply`` unpacks each into its snapshot with ``layer_reader`` (inflate, verify) and
  ``tar_apply`` (containerd's apply semantics) while writing it into the content store;
  ``fetch_settings`` says how, without imports.

May import: the standard library, grpc and the generated stubs, and the shared top-level
modules ``snapshotter.errors``, ``model``, ``labels``, ``lazy_formats`` and ``daemon_api``.
``registry`` is imported through its root. The modules the CLI imports before its first RPC,
``daemon_client``, ``registry_blobs`` and ``progress``, import it lazily inside functions.
Never ``store``, ``remote`` or ``daemon``: the client runs in the CLI process, which must not
load the snapshotter itself. ``tests/test_dependency_rule.py`` checks this.
"""
