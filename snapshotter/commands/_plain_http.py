"""``--plain-http``: its own module so that ``_containerd_args`` needs ``registry`` (and httpx)
only when a command actually builds a registry client."""

from __future__ import annotations

import dataclasses

from registry import HostsConfig, RegistryHost


class PlainHTTPHosts(HostsConfig):
    """The configured hosts, with https replaced by http (as ``ctr``)."""

    def hosts_for(self, registry: str) -> list[RegistryHost]:
        return [
            dataclasses.replace(host, api_url=host.api_url.replace("https://", "http://", 1))
            for host in super().hosts_for(registry)
        ]
