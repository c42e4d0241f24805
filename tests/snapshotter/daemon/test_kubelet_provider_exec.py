"""Running a credential provider plugin: the request it reads, the answers refused, and the
plugins that hang or print garbage, each bounded and none quoted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

from snapshotter.daemon.kubelet_provider_config import ProviderConfig
from snapshotter.daemon.kubelet_provider_exec import (
    ProviderFailed,
    ProviderResponse,
    parse_response,
    run_provider,
)

V1 = "credentialprovider.kubelet.k8s.io/v1"
SECRET = "Plugin-Secret-42"


def _provider(name: str = "plugin", **fields: object) -> ProviderConfig:
    base: dict[str, object] = {"name": name, "match_images": ("reg.io",),
                               "default_cache_duration": 60.0, "api_version": V1}
    base.update(fields)
    return ProviderConfig(**base)  # type: ignore[arg-type]


def _script(bin_dir: Path, body: str, name: str = "plugin") -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return path


ECHO_PLUGIN = f"""
request = json.load(sys.stdin)
with open(os.path.join(os.path.dirname(sys.argv[0]), "seen.json"), "w") as out:
    json.dump({{"request": request, "argv": sys.argv[1:], "env": os.environ.get("PLUGIN_ENV"),
               "path": os.environ.get("PATH")}}, out)
json.dump({{"apiVersion": request["apiVersion"], "kind": "CredentialProviderResponse",
           "cacheKeyType": "Registry", "cacheDuration": "90s",
           "auth": {{"reg.io": {{"username": "u", "password": "{SECRET}"}}}}}}, sys.stdout)
"""


def test_request_args_env_and_answer(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, ECHO_PLUGIN)
    provider = _provider(args=("get-credentials", "--x"), env=(("PLUGIN_ENV", "from-config"),))
    answer = trio.run(run_provider, provider, bin_dir, "reg.io/team/app")
    seen = json.loads((bin_dir / "seen.json").read_text())
    assert seen["request"] == {"apiVersion": V1, "kind": "CredentialProviderRequest",
                               "image": "reg.io/team/app"}
    assert seen["argv"] == ["get-credentials", "--x"]
    assert seen["env"] == "from-config" and seen["path"] == os.environ["PATH"]
    assert answer.cache_key_type == "Registry" and answer.cache_duration == 90
    assert answer.auth["reg.io"].password == SECRET
    assert SECRET not in repr(answer)


def test_a_hung_plugin_and_its_children_are_killed_in_bounded_time(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "import subprocess\nsubprocess.Popen(['sleep', '300'])\ntime.sleep(300)")
    with pytest.raises(ProviderFailed, match=r"did not answer within 0\.5s and was killed"):
        trio.run(run_provider, _provider(), bin_dir, "reg.io/app", 0.5)
    # Its child (same process group) went too: nothing of the plugin's group keeps running.
    leftovers = [p for p in os.listdir("/proc") if p.isdigit()
                 and _cmdline(p).startswith(f"{sys.executable}\0{bin_dir}")]
    assert leftovers == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (f"print('garbage {SECRET}')", "not JSON"),
        (f"sys.stderr.write('{SECRET}'); sys.exit(3)", "exited with status 3"),
        ("print(json.dumps([1]))", "not a JSON object"),
        ("sys.stdout.write('x' * (2 * 1024 * 1024))", "printed more than"),
    ],
)
def test_a_failing_plugin_is_an_error_without_its_output(
    tmp_path: Path, body: str, reason: str
) -> None:
    bin_dir = tmp_path / "bin"
    _script(bin_dir, body)
    with pytest.raises(ProviderFailed, match=reason) as raised:
        trio.run(run_provider, _provider(), bin_dir, "reg.io/app", 10.0)
    assert SECRET not in str(raised.value)


def test_a_missing_plugin_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProviderFailed, match="cannot run"):
        trio.run(run_provider, _provider("absent"), tmp_path, "reg.io/app", 5.0)


def _answer(**fields: object) -> bytes:
    base: dict[str, object] = {"apiVersion": V1, "kind": "CredentialProviderResponse",
                               "cacheKeyType": "Image"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_answer(apiVersion="credentialprovider.kubelet.k8s.io/v1beta1"), "apiVersion"),
        (_answer(kind="CredentialProviderRequest"), "kind"),
        (_answer(cacheKeyType="Pod"), "cacheKeyType"),
        (_answer(cacheKeyType=None), "cacheKeyType"),
        (_answer(cacheDuration="soon"), "cacheDuration"),
        (_answer(cacheDuration=5), "cacheDuration"),
        (_answer(cacheDuration="-5m"), "cacheDuration"),
        (_answer(auth=[SECRET]), "auth"),
        (_answer(auth={"reg.io": {"username": "u", "password": 7}}), "auth entries"),
        (_answer(auth={"reg.io": {"token": SECRET}}), "auth entries"),
        (_answer(extra=SECRET), "unknown fields extra"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_answers_kubelet_would_refuse(raw: bytes, reason: str) -> None:
    with pytest.raises(ProviderFailed, match=reason) as raised:
        parse_response(_provider(), raw)
    assert SECRET not in str(raised.value)


def test_an_answer_without_cache_duration_or_auth() -> None:
    assert parse_response(_provider(), _answer()) == ProviderResponse("Image", None, {})
