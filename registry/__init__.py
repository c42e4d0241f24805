"""An OCI distribution client on httpx: references, hosts, auth, manifests, ranged blob reads.

Never imports ``fusefs`` or ``snapshotter``; no httpx type appears in this public surface.

The client, its blobs and the credential providers are imported on first use: httpx and anyio
take longer to import than everything else here, and a caller that only parses references and
manifests (``lazysnap pull`` through the daemon) should not wait for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from registry.errors import (
    AuthenticationError,
    AuthorizationError,
    CredentialsError,
    DigestMismatchError,
    HostsConfigError,
    InvalidReferenceError,
    ManifestError,
    NotFoundError,
    OCIErrorDetail,
    PlatformNotFoundError,
    ProtocolError,
    RangeNotSatisfiableError,
    RangeNotSupportedError,
    RegistryError,
    RegistryTimeoutError,
    ServerError,
    TransportError,
    UnsupportedDigestError,
)
from registry.hosts import (
    DEFAULT_HOSTS_DIR,
    HOSTS_DIR_ENV,
    HostsConfig,
    RegistryHost,
    parse_hosts_toml,
    resolve_hosts_dir,
)
from registry.manifest import (
    Descriptor,
    Index,
    Manifest,
    Platform,
    host_platform,
    parse_manifest,
    parse_platform,
    select_manifest,
)
from registry.options import ClientOptions
from registry.reference import Reference, parse_reference
from registry.referrers import Referrer, ReferrerList, fallback_tag, parse_referrers
from registry.stats import RegistryStats

if TYPE_CHECKING:
    from registry.blob import RemoteBlob
    from registry.client import ManifestContent, RegistryClient, ResolvedImage, create_client
    from registry.credentials import (
        CredentialProvider,
        Credentials,
        DockerConfigCredentials,
        ForgetfulCredentialProvider,
        StaticCredentials,
        forget_credentials,
    )

# Name -> the module that defines it, for the names imported on first use.
_ON_FIRST_USE = {
    "RemoteBlob": "registry.blob",
    "ManifestContent": "registry.client",
    "RegistryClient": "registry.client",
    "ResolvedImage": "registry.client",
    "create_client": "registry.client",
    "CredentialProvider": "registry.credentials",
    "Credentials": "registry.credentials",
    "DockerConfigCredentials": "registry.credentials",
    "ForgetfulCredentialProvider": "registry.credentials",
    "StaticCredentials": "registry.credentials",
    "forget_credentials": "registry.credentials",
}


# Hidden from type checkers, which see the names above: a module-level __getattr__ would make
# them accept any name imported from this package, misspelt or missing ones included.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _ON_FIRST_USE.get(name)
        if module is None:
            raise AttributeError(f"module 'registry' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups do not come here again
        return value


__all__ = [
    "DEFAULT_HOSTS_DIR",
    "HOSTS_DIR_ENV",
    "AuthenticationError",
    "AuthorizationError",
    "ClientOptions",
    "CredentialProvider",
    "Credentials",
    "CredentialsError",
    "Descriptor",
    "DigestMismatchError",
    "DockerConfigCredentials",
    "ForgetfulCredentialProvider",
    "HostsConfig",
    "HostsConfigError",
    "Index",
    "InvalidReferenceError",
    "Manifest",
    "ManifestContent",
    "ManifestError",
    "NotFoundError",
    "OCIErrorDetail",
    "Platform",
    "PlatformNotFoundError",
    "ProtocolError",
    "RangeNotSatisfiableError",
    "RangeNotSupportedError",
    "Reference",
    "Referrer",
    "ReferrerList",
    "RegistryClient",
    "RegistryError",
    "RegistryHost",
    "RegistryStats",
    "RegistryTimeoutError",
    "RemoteBlob",
    "ResolvedImage",
    "ServerError",
    "StaticCredentials",
    "TransportError",
    "UnsupportedDigestError",
    "create_client",
    "fallback_tag",
    "forget_credentials",
    "host_platform",
    "parse_hosts_toml",
    "parse_manifest",
    "parse_platform",
    "parse_reference",
    "parse_referrers",
    "resolve_hosts_dir",
    "select_manifest",
]
