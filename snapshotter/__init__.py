"""The containerd side of lazysnap: the proxy snapshotter, its daemon and its CLI.

This package may import the package roots of ``fusefs`` and ``registry``; they never import it.
"""

__all__: list[str] = []
