"""The containerd side of lazysnap: the proxy snapshotter, its daemon, its client and its CLI.

General layout, lowest layer first. Each subpackage may import the ones listed before it, with
the exceptions its own docstring names; ``tests/test_dependency_rule.py`` checks all of it.

* Shared building blocks at the top, which import none of the subpackages: ``errors`` holds
  the domain errors, ``model`` the plain snapshot types, ``labels`` every label key with who
  sets it, ``lazy_formats`` which layer formats can be lazy, and ``daemon_api`` the plain
  contract of lazysnap's own Daemon service. ``logs`` and ``version`` complete them.
* ``store``: containerd's snapshot semantics over sqlite and directories. It knows nothing of
  FUSE, registries, trio or gRPC; lazily served layers reach it through its own small protocol,
  ``store.remote.RemoteLayers``.
* ``client``: what ``lazysnap pull`` and ``unpack`` do as containerd clients. Independent of
  the store and of the daemon.
* ``convert``: ``lazysnap convert``, making images lazily pullable.
* ``remote``: the trio side. A Prepare's labels become a layer mounted under the FUSE mount;
  ``remote.bridge.TrioBridge`` is the gRPC threads' way in and implements the store's protocol.
* ``daemon``: the process. It composes the others, serves gRPC, holds the configuration and
  keeps the FUSE connection alive across crashes.
* ``commands`` and ``cli``: the ``lazysnap`` command line, one module per sub-command.

This package may import the package roots of ``fusefs`` and ``registry``; they never import it.
"""

__all__: list[str] = []
