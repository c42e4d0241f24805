from __future__ import annotations

from pathlib import Path

import pytest

from registry import HostsConfig, HostsConfigError, parse_hosts_toml, resolve_hosts_dir
from registry.hosts import ClientCert, default_hosts, is_loopback_host

BASE = Path("/etc/containerd/certs.d/r.io")


def test_defaults() -> None:
    assert [h.api_url for h in default_hosts("docker.io")] == ["https://registry-1.docker.io/v2"]
    assert [h.api_url for h in default_hosts("r.io:5000")] == ["https://r.io:5000/v2"]
    assert [h.api_url for h in default_hosts("localhost:5000")] == ["http://localhost:5000/v2"]
    assert [h.api_url for h in default_hosts("127.0.0.1:5000")] == ["http://127.0.0.1:5000/v2"]
    assert [h.api_url for h in default_hosts("[::1]:5000")] == ["http://[::1]:5000/v2"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.2:80", True),
        ("[::1]:5000", True),
        ("r.io", False),
        ("10.0.0.1", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_mirrors_in_order_then_server() -> None:
    text = """
server = "https://r.io"
ca = "server-ca.pem"

[header]
x-top = "1"

[host."https://mirror-a.test"]
  capabilities = ["pull", "resolve"]
  ca = ["/abs/ca.pem", "rel-ca.pem"]
  client = [["client.cert", "client.key"], "combined.pem"]
  [host."https://mirror-a.test".header]
    x-a = ["1", "2"]

[host."http://mirror-b.test:8080/custom/v2"]
  capabilities = ["pull"]
  skip_verify = true

[host."mirror-c.test/prefix"]
  override_path = true
"""
    hosts = parse_hosts_toml(text, "r.io", base_dir=BASE)
    assert [h.api_url for h in hosts] == [
        "https://mirror-a.test/v2",
        "http://mirror-b.test:8080/custom/v2",
        "https://mirror-c.test/prefix",
        "https://r.io/v2",
    ]
    a, b, c, server = hosts
    assert a.capabilities == {"pull", "resolve"} and a.is_mirror
    assert a.ca_files == (Path("/abs/ca.pem"), BASE / "rel-ca.pem")
    assert a.client_certs == (
        ClientCert(BASE / "client.cert", BASE / "client.key"),
        ClientCert(BASE / "combined.pem"),
    )
    assert a.headers == {"x-a": ("1", "2")}
    assert b.skip_verify and b.can("pull") and not b.can("resolve")
    assert c.capabilities == {"pull", "resolve", "push"}
    assert not server.is_mirror and server.ca_files == (BASE / "server-ca.pem",)
    assert server.headers == {"x-top": ("1",)}
    assert not server.skip_verify


def test_server_defaults_to_registry() -> None:
    hosts = parse_hosts_toml('[host."https://m.test"]\n', "docker.io", base_dir=BASE)
    assert [h.api_url for h in hosts] == ["https://m.test/v2", "https://registry-1.docker.io/v2"]


def test_plain_http_server() -> None:
    (server,) = parse_hosts_toml('server = "http://r.io:5000"', "r.io:5000", base_dir=BASE)
    assert server.scheme == "http" and server.netloc == "r.io:5000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = ", "invalid TOML"),
        ('server = "ftp://x"', "unsupported scheme"),
        ('[host."https://m"]\ncapabilities = ["pull", "fly"]', "unknown capabilities"),
        ('[host."https://m"]\nskip_verify = "yes"', "must be booleans"),
        ("server = 5", "server must be a string"),
        ('[host."https://m"]\nclient = [["a", "b", "c"]]', "client pairs"),
        ("[header]\nx = 5", "must be a string or a list"),
        ("[header]\nx = [5]", "must be strings"),
        # Found by fuzzing: tables nested past the recursion limit escaped as RecursionError.
        ("x = " + "{a = " * 3000 + "1" + "}" * 3000, "invalid TOML"),
        # Found by fuzzing: a list among the capabilities escaped as TypeError (unhashable).
        ("capabilities = [[]]", "unknown capabilities"),
        # Found by fuzzing: urllib's ValueError for a broken IPv6 literal escaped as is.
        ('[host."https://[::1"]', "Invalid IPv6 URL"),
    ],
)
def test_bad_hosts_toml(text: str, message: str) -> None:
    with pytest.raises(HostsConfigError, match=message):
        parse_hosts_toml(text, "r.io", base_dir=BASE)


def test_hosts_dir_lookup(tmp_path: Path) -> None:
    (tmp_path / "r.io:5000").mkdir()
    (tmp_path / "r.io:5000" / "hosts.toml").write_text('server = "http://r.io:5000"\n')
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('[host."https://fallback.test"]\n')
    (tmp_path / "legacy.io").mkdir()
    (tmp_path / "legacy.io" / "ca.crt").write_text("x")
    config = HostsConfig(tmp_path)
    assert [h.api_url for h in config.hosts_for("r.io:5000")] == ["http://r.io:5000/v2"]
    assert [h.api_url for h in config.hosts_for("other.io")] == [
        "https://fallback.test/v2",
        "https://other.io/v2",
    ]
    (legacy,) = config.hosts_for("legacy.io")
    assert legacy.ca_files == (tmp_path / "legacy.io" / "ca.crt",)


def test_missing_dir_gives_defaults(tmp_path: Path) -> None:
    config = HostsConfig(tmp_path / "nope")
    assert [h.api_url for h in config.hosts_for("r.io")] == ["https://r.io/v2"]


def test_hosts_dir_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAZYSNAP_HOSTS_DIR", raising=False)
    assert resolve_hosts_dir(None) == Path("/etc/containerd/certs.d")
    monkeypatch.setenv("LAZYSNAP_HOSTS_DIR", "/from/env")
    assert resolve_hosts_dir(None) == Path("/from/env")
    assert resolve_hosts_dir("/from/flag") == Path("/from/flag")
    assert HostsConfig().hosts_dir == Path("/from/env")
