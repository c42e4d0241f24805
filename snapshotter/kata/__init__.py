"""Kata Containers: the host-side mount helper of guest-pull mode (docs/kata.md).

May import ``store`` (the volume rules and the mount option budget) and the shared top-level
modules; never ``remote``, ``daemon``, ``client``, ``convert`` or ``commands``: the helper runs
in containerd's mount path and must start quickly with nothing but the standard library.
"""

__all__: list[str] = []
