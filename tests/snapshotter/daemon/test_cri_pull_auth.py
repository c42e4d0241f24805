"""A CRI PullImage auth becomes credentials for the image's host and repository only."""

from __future__ import annotations

import base64

import pytest

from registry import Credentials
from snapshotter.daemon.cri_pull_auth import CaptureRefused, PullAuth, capture, server_host

IMAGE = "reg.example:5000/team/app:1"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_username_and_password_are_kept_for_the_image_repository() -> None:
    captured = capture(PullAuth(IMAGE, username="bob", password="pw",
                                server_address="reg.example:5000"))
    assert (captured.host, captured.repository) == ("reg.example:5000", "team/app")
    assert captured.credentials == Credentials("bob", "pw")


def test_base64_auth_and_identity_token_are_understood() -> None:
    assert capture(PullAuth(IMAGE, auth=_b64("bob:p:w"))).credentials == Credentials("bob", "p:w")
    token = capture(PullAuth(IMAGE, identity_token="refresh")).credentials
    assert token == Credentials(identity_token="refresh")


def test_docker_hub_auth_applies_to_a_short_image_name() -> None:
    captured = capture(PullAuth("busybox", username="u", password="p",
                                server_address="https://index.docker.io/v1/"))
    assert (captured.host, captured.repository) == ("docker.io", "library/busybox")


@pytest.mark.parametrize("server", ["https://other.example:5000/v2/", "reg.example",
                                    "reg.example:5001"])
def test_auth_for_another_host_is_refused(server: str) -> None:
    with pytest.raises(CaptureRefused, match="another registry host"):
        capture(PullAuth(IMAGE, username="bob", password="pw", server_address=server))


@pytest.mark.parametrize("bad", ["not base64!", _b64("no-colon"), _b64(":no-user")])
def test_malformed_auth_is_refused_without_quoting_it(bad: str) -> None:
    with pytest.raises(CaptureRefused) as refused:
        capture(PullAuth(IMAGE, auth=bad))
    assert bad not in str(refused.value)
    assert "no-colon" not in str(refused.value)


def test_a_registry_token_or_a_bad_reference_is_refused() -> None:
    with pytest.raises(CaptureRefused, match="registry_token"):
        capture(PullAuth(IMAGE, registry_token="bearer"))
    with pytest.raises(CaptureRefused, match="not a valid reference"):
        capture(PullAuth("UPPER CASE/x", username="u", password="p"))


def test_server_host_strips_scheme_and_path() -> None:
    assert server_host("https://Reg.Example:5000/v1/") == "reg.example:5000"
    assert server_host("reg.example") == "reg.example"


def test_the_secret_is_not_in_the_repr() -> None:
    pull = PullAuth(IMAGE, username="bob", password="pw-secret", auth=_b64("bob:x"),
                    identity_token="tok-secret")
    assert "pw-secret" not in repr(pull) and "tok-secret" not in repr(pull)
