"""Fuzzing the daemon's config file: any bytes give a Config or a ConfigError, and a Config
read from a file holds only values of the documented kinds."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from snapshotter.daemon.config import LOG_FORMATS, LOG_LEVELS, ConfigError, load_config
from tests.fuzzing import fuzz_settings
from tests.registry.test_hosts_fuzz import toml_value

scalars = st.one_of(
    st.booleans(),
    st.integers(-5, 2**64),
    st.integers(0, 2**40),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
)
paths = st.one_of(
    st.sampled_from(["/var/lib/x", "relative", "", "/", "/a\u00e9/b", "~/x"]), scalars
)
tables: dict[str, Any] = {
    "log": st.fixed_dictionaries({}, optional={
        "level": st.one_of(st.sampled_from([*LOG_LEVELS, "INFO", "trace", ""]), scalars),
        "format": st.one_of(st.sampled_from([*LOG_FORMATS, "Text", "xml"]), scalars),
        "extra": scalars}),
    "lazy": st.fixed_dictionaries({}, optional={
        "enabled": scalars, "background_fetch": scalars, "keep_mounted_on_stop": scalars,
        "cache_capacity": scalars, "cache": scalars}),
    "kata": st.fixed_dictionaries({}, optional={
        "guest_pull": scalars,
        "mount_helper": st.one_of(paths, st.sampled_from(["/usr/bin/nydus-overlayfs-x",
                                                          "/nydus-overlayfs/x"])),
        "other": scalars}),
}  # fmt: skip


def config_document(top: dict[str, Any], sections: dict[str, Any]) -> str:
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        else:
            lines.append(f"{name} = {toml_value(table)}")
    return "\n".join(lines) + "\n"


documents = st.builds(
    config_document,
    st.fixed_dictionaries({}, optional={"root": paths, "address": paths, "hosts_dir": paths,
                                        "unknown": scalars}),
    st.fixed_dictionaries({}, optional={name: st.one_of(table, scalars)
                                        for name, table in tables.items()}),
)  # fmt: skip
contents = st.one_of(
    documents.map(str.encode),
    documents.flatmap(lambda text: st.tuples(st.integers(0, len(text)), st.binary(max_size=3)).map(
        lambda cut: text.encode()[: cut[0]] + cut[1] + text.encode()[cut[0] + 1 :])),
    st.binary(max_size=40),
    st.integers(1, 3000).map(lambda depth: b"[lazy]\nx = " + b"[" * depth + b"]" * depth),
)  # fmt: skip


@fuzz_settings(300)
@given(contents)
def test_config_files_give_a_config_or_a_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "config.toml")
        path.write_bytes(content)
        try:
            config = load_config(path)
        except ConfigError:
            return
    for where in (config.root, config.address, config.hosts_dir):
        assert where.is_absolute()
    assert config.log.level in LOG_LEVELS and config.log.format in LOG_FORMATS
    assert isinstance(config.lazy.cache_capacity, int) and config.lazy.cache_capacity >= 0
    assert all(isinstance(flag, bool) for flag in (
        config.lazy.enabled, config.lazy.background_fetch, config.lazy.keep_mounted_on_stop,
        config.kata.guest_pull))  # fmt: skip
