"""Image references, parsed and normalised the way docker and containerd do (pure).

``busybox`` -> ``docker.io/library/busybox:latest``; ``host:port/repo:tag``;
``repo@sha256:...``; ``repo:tag@sha256:...``; IPv6 literal hosts ``[::1]:5000/x``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidReferenceError, UnsupportedDigestError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_MAX = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DOMAIN_NAME = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
)
_IPV6 = re.compile(r"\[[a-fA-F0-9:.%]+\]")
_PORT = re.compile(r"[0-9]{1,5}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed ``algorithm:hex`` digest we can verify."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise UnsupportedDigestError(f"malformed digest {digest!r}")
    algorithm, encoded = match.groups()
    expected = _HEX_LENGTHS.get(algorithm)
    if expected is None:
        raise UnsupportedDigestError(f"unsupported digest algorithm {algorithm!r}")
    if len(encoded) != expected or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise UnsupportedDigestError(
            f"digest {digest!r}: {algorithm} needs {expected} lowercase hex characters"
        )
    return digest


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalised reference. ``path`` is the repository inside the registry."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``, the familiar-free repository name."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the manifests endpoint for: the digest when pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _looks_like_domain(component: str) -> bool:
    # docker's rule: the first component is a host when it has a dot or a port, or is
    # localhost or an IPv6 literal. "library/busybox" and "user/app" are Docker Hub paths.
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.startswith("[")
        or component != component.lower()
    )


def _validate_domain(domain: str, text: str) -> None:
    host, port = domain, None
    if domain.startswith("["):
        end = domain.find("]")
        if end < 0:
            raise InvalidReferenceError(f"invalid reference {text!r}: unclosed IPv6 literal")
        host, rest = domain[: end + 1], domain[end + 1 :]
        if not _IPV6.fullmatch(host):
            raise InvalidReferenceError(f"invalid reference {text!r}: bad IPv6 literal {host!r}")
        if rest:
            if not rest.startswith(":"):
                raise InvalidReferenceError(f"invalid reference {text!r}: bad host {domain!r}")
            port = rest[1:]
    else:
        if domain.count(":") > 1:
            raise InvalidReferenceError(
                f"invalid reference {text!r}: IPv6 hosts must be in brackets ([::1]:5000)"
            )
        host, _, port_text = domain.partition(":")
        port = port_text if ":" in domain else None
        if not _DOMAIN_NAME.fullmatch(host):
            raise InvalidReferenceError(f"invalid reference {text!r}: bad host {host!r}")
    if port is not None and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536):
        raise InvalidReferenceError(f"invalid reference {text!r}: bad port {port!r}")


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise ``text``; raise ``InvalidReferenceError`` saying what is wrong.

    With ``default_tag`` (the default) a reference with neither tag nor digest gets ``latest``.
    """
    if not text or text != text.strip():
        raise InvalidReferenceError(f"invalid reference {text!r}: empty or has spaces")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        try:
            validate_digest(digest)
        except UnsupportedDigestError as exc:
            raise InvalidReferenceError(f"invalid reference {text!r}: {exc.message}") from exc
    # A tag is whatever follows the last ":" that comes after the last "/".
    tag = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid reference {text!r}: bad tag {tag!r}")
    if not remainder:
        raise InvalidReferenceError(f"invalid reference {text!r}: no repository name")
    first, sep, rest = remainder.partition("/")
    if sep and _looks_like_domain(first):
        domain, path = first, rest
        _validate_domain(domain, text)
        # Host names are case-insensitive, but one that is a host only by its capitals would
        # read back as a Docker Hub namespace once lowered: docker keeps those as written.
        if not domain.startswith("[") and _looks_like_domain(domain.lower()):
            domain = domain.lower()
    else:
        domain, path = DEFAULT_DOMAIN, remainder
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            hint = " (repository names must be lowercase)" if component.lower() != component else ""
            raise InvalidReferenceError(
                f"invalid reference {text!r}: bad path component {component!r}{hint}"
            )
    if len(domain) + 1 + len(path) > NAME_TOTAL_MAX:
        raise InvalidReferenceError(f"invalid reference {text!r}: name longer than 255 characters")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)
