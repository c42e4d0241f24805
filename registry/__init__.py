"""An OCI distribution client on httpx: references, hosts, auth, manifests, ranged blob reads.

Never imports ``fusefs`` or ``snapshotter``.
"""

__all__: list[str] = []
