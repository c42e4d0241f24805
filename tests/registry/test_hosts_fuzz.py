"""Fuzzing hosts.toml: any text gives hosts or a HostsConfigError, never another exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from registry.errors import HostsConfigError
from registry.hosts import parse_hosts_toml
from tests.fuzzing import fuzz_settings

BASE = Path("/etc/lazysnap/certs.d/r.example")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


urls = st.one_of(
    st.sampled_from([
        "https://mirror.example", "http://127.0.0.1:5000", "mirror.example/v2", "ftp://x",
        "https://", "https://[::1]:5000", "https://[::1", "http://[zz]/", "https://h:99999",
        "https://h:port", "https://h/v2/", "//h", "", "https://user:pw@h", "https://h?q#f",
    ]),
    st.text(alphabet="htps:/[]:.9%@ ?#", max_size=15),
)  # fmt: skip
scalars = st.one_of(st.booleans(), st.integers(-5, 2**64), st.text(max_size=6))
strings_or_lists = st.one_of(
    st.text(max_size=8), st.lists(st.one_of(st.text(max_size=8), scalars), max_size=3), scalars
)
capabilities = st.one_of(
    st.lists(st.sampled_from(["pull", "resolve", "push", "PULL", ""]), max_size=4),
    st.lists(st.one_of(scalars, st.lists(scalars, max_size=2),
                       st.dictionaries(st.text(max_size=3), scalars, max_size=1)), max_size=2),
    scalars,
)  # fmt: skip
host_tables = st.fixed_dictionaries(
    {},
    optional={
        "capabilities": capabilities,
        "skip_verify": scalars,
        "override_path": scalars,
        "ca": strings_or_lists,
        "client": st.one_of(
            strings_or_lists, st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=2)
        ),
        "header": st.one_of(st.dictionaries(st.text(max_size=6), strings_or_lists, max_size=2),
                            scalars),
        "typo": scalars,
    },
)  # fmt: skip


def hosts_document(server: Any, top: dict[str, Any], mirrors: dict[str, Any]) -> str:
    lines = [] if server is None else [f"server = {toml_value(server)}"]
    lines += [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for url, table in mirrors.items():
        lines.append(f"[host.{json.dumps(url, ensure_ascii=False)}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


documents = st.builds(
    hosts_document,
    st.one_of(st.none(), urls, scalars),
    host_tables,
    st.dictionaries(urls, host_tables, max_size=3),
)
mutated = documents.flatmap(
    lambda text: st.tuples(st.integers(0, len(text)), st.text('[]{}="\\.,\n #', max_size=3)).map(
        lambda cut: text[: cut[0]] + cut[1] + text[cut[0] + 1 :]
    )
)
texts = st.one_of(
    documents,
    mutated,
    st.text(max_size=60),
    st.integers(1, 3000).map(lambda depth: "x = " + "[" * depth + "]" * depth),
    st.integers(1, 3000).map(lambda depth: "x = " + "{a = " * depth + "1" + "}" * depth),
)


@fuzz_settings(400)
@given(texts)
def test_hosts_toml_gives_hosts_or_a_config_error(text: str) -> None:
    try:
        hosts = parse_hosts_toml(text, "r.example", base_dir=BASE)
    except HostsConfigError:
        return
    assert hosts and not hosts[-1].is_mirror
    for host in hosts:
        assert host.scheme in ("http", "https") and host.netloc
        assert host.capabilities <= {"pull", "resolve", "push"}
