"""kubelet's CredentialProviderConfig, read as kubelet reads it, and hostile files refused
without quoting them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshotter.daemon.kubelet_provider_config import (
    MAX_CONFIG_BYTES,
    ProviderConfigError,
    load_provider_config,
    parse_go_duration,
    parse_provider_config,
)

YAML = b"""\
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "registry.io:8080/path"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args:
      - get-credentials
    env:
      - name: AWS_PROFILE
        value: temp-Secret-Value
"""


def _provider(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "p", "matchImages": ["reg.io"], "defaultCacheDuration": "5m",
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def _document(*providers: dict[str, object]) -> bytes:
    return json.dumps({"apiVersion": "kubelet.config.k8s.io/v1",
                       "kind": "CredentialProviderConfig", "providers": list(providers)}).encode()


def test_the_documented_yaml_example() -> None:
    loaded = parse_provider_config(YAML)
    (provider,) = loaded.providers
    assert loaded.skipped == ()
    assert provider.name == "ecr-credential-provider"
    assert provider.match_images == ("*.dkr.ecr.*.amazonaws.com", "registry.io:8080/path")
    assert provider.default_cache_duration == 12 * 3600
    assert provider.args == ("get-credentials",)
    assert provider.env == (("AWS_PROFILE", "temp-Secret-Value"),)
    assert "temp-Secret-Value" not in repr(provider) and "get-credentials" not in repr(provider)


def test_json_works_too(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(_document(_provider(name="a"), _provider(name="b", apiVersion=(
        "credentialprovider.kubelet.k8s.io/v1beta1"))))
    assert [p.name for p in load_provider_config(path).providers] == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("12h", 43200), ("1h30m", 5400), ("5m0s", 300), ("1.5h", 5400), ("300ms", 0.3),
     ("0", 0), ("0s", 0), ("-1s", -1), ("2h45m30.5s", 9930.5)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "h", "1d", "5 m", "1h-2m", "abc", "1e3s"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": "a/b"}, "name"),
        ({"name": ".."}, "name"),
        ({"name": "a b"}, "name"),
        ({"name": None}, "name is required"),
        ({"matchImages": []}, "matchImages"),
        ({"matchImages": "reg.io"}, "matchImages"),
        ({"matchImages": ["reg[.io"]}, "matchImages entry"),
        ({"defaultCacheDuration": None}, "defaultCacheDuration is required"),
        ({"defaultCacheDuration": "-5m"}, "negative"),
        ({"defaultCacheDuration": "soon"}, "duration"),
        ({"apiVersion": "credentialprovider.kubelet.k8s.io/v2"}, "apiVersion"),
        ({"env": [{"name": "A", "value": 1}]}, "env"),
        ({"env": [{"name": "A=B", "value": "x"}]}, "env"),
        ({"args": [1]}, "args"),
        ({"extra": True}, "unknown fields extra"),
        ({"tokenAttributes": {"serviceAccountTokenAudience": "x"}}, "tokenAttributes"),
    ],
)
def test_a_provider_kubelet_would_refuse_is_left_out_with_why(
    fields: dict[str, object], reason: str
) -> None:
    loaded = parse_provider_config(_document(_provider(name="good"), _provider(**fields)))
    assert [p.name for p in loaded.providers] == ["good"]
    ((_, why),) = loaded.skipped
    assert reason in why


def test_duplicate_names_keep_the_first() -> None:
    loaded = parse_provider_config(_document(_provider(args=["one"]), _provider(args=["two"])))
    assert [p.args for p in loaded.providers] == [("one",)]
    assert "same name" in loaded.skipped[0][1]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"- a list",
        b"{not yaml: [",
        b"\xff\xfe\x00garbage",
        b"[" * 5_000,
        json.dumps({"kind": "Other", "apiVersion": "kubelet.config.k8s.io/v1"}).encode(),
        json.dumps({"kind": "CredentialProviderConfig", "apiVersion": "v1"}).encode(),
        json.dumps({"kind": "CredentialProviderConfig",
                    "apiVersion": "kubelet.config.k8s.io/v1", "providers": []}).encode(),
        b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nkind: *c\n",
        b"!!python/object/apply:os.system ['echo pwned']",
    ],
)
def test_hostile_files_are_refused(raw: bytes) -> None:
    with pytest.raises(ProviderConfigError):
        parse_provider_config(raw)


def test_a_parse_error_never_quotes_the_file() -> None:
    raw = b"providers:\n  - env: [{name: A, value: 'Hunter2-Secret'}\n  bad: ["
    with pytest.raises(ProviderConfigError) as raised:
        parse_provider_config(raw)
    assert "Hunter2" not in str(raised.value)


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(YAML + b"#" * MAX_CONFIG_BYTES)
    with pytest.raises(ProviderConfigError, match="larger"):
        load_provider_config(path)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="cannot read"):
        load_provider_config(tmp_path / "absent.yaml")
