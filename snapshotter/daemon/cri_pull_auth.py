"""Turning the auth of a CRI ``PullImage`` into registry credentials for the image's repository.

kubelet sends the pull secret that matched the image: a username and password, a base64
``auth`` of ``user:password``, or an identity token, and in ``server_address`` the registry it
was given for. The credentials are used only for the host the image reference names; a
secret for another host is refused, as containerd itself ignores it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from registry import Credentials, InvalidReferenceError, parse_reference

_DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class CaptureRefused(Exception):
    """The auth cannot be used for the image; the message says why and holds no secret."""


@dataclass(frozen=True, slots=True)
class PullAuth:
    """The image and the ``AuthConfig`` fields of one ``PullImageRequest``."""

    image: str
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def has_secret(self) -> bool:
        return any((self.username, self.password, self.auth, self.identity_token,
                    self.registry_token))


@dataclass(frozen=True, slots=True)
class Captured:
    host: str
    repository: str
    credentials: Credentials


def same_host(one: str, other: str) -> bool:
    """Whether two registry hosts are one, Docker Hub's names counting as one host."""
    a, b = one.strip().lower(), other.strip().lower()
    return a == b or (a in _DOCKER_HUB and b in _DOCKER_HUB)


def server_host(server_address: str) -> str:
    """The host of ``server_address``, which kubelet passes as the docker config key it matched:
    ``host``, ``host:port``, ``https://host/v1/`` and the like."""
    text = server_address.strip()
    _, separator, rest = text.partition("://")
    if separator:
        text = rest
    return text.split("/", 1)[0].lower()


def _credentials(pull: PullAuth) -> Credentials:
    # The precedence containerd's CRI plugin applies to the same fields.
    if pull.username:
        return Credentials(username=pull.username, password=pull.password)
    if pull.identity_token:
        return Credentials(identity_token=pull.identity_token)
    if pull.auth:
        try:
            decoded = base64.b64decode(pull.auth.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise CaptureRefused("auth is not base64 of user:password") from None
        username, colon, password = decoded.partition(":")
        if not colon or not username:
            raise CaptureRefused("auth is not base64 of user:password") from None
        return Credentials(username=username, password=password.strip("\x00"))
    if pull.registry_token:
        raise CaptureRefused("registry_token auth is not supported for lazy reads")
    raise CaptureRefused("auth has no username, identity token or auth")


def capture(pull: PullAuth) -> Captured:
    """The credentials of ``pull`` for its image's host and repository."""
    try:
        reference = parse_reference(pull.image)
    except InvalidReferenceError:
        raise CaptureRefused("the image is not a valid reference") from None
    if pull.server_address and not same_host(server_host(pull.server_address),
                                             reference.domain):
        raise CaptureRefused("the auth is for another registry host than the image's")
    return Captured(reference.domain.lower(), reference.path, _credentials(pull))
