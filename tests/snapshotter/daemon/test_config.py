"""The daemon configuration: documented defaults, TOML file, flags over the file, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusefs import FetchConfig
from snapshotter.daemon.config import (
    DEFAULT_ADDRESS,
    DEFAULT_HOSTS_DIR,
    DEFAULT_ROOT,
    Config,
    ConfigError,
    LazyConfig,
    load_config,
    parse_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[3]


def test_defaults_are_the_documented_ones() -> None:
    config = Config()
    assert config.root == DEFAULT_ROOT == Path("/var/lib/lazysnap")
    assert config.address == DEFAULT_ADDRESS == Path("/run/lazysnap/lazysnap.sock")
    assert config.hosts_dir == DEFAULT_HOSTS_DIR == Path("/etc/containerd/certs.d")
    assert (config.log.level, config.log.format) == ("info", "json")


def test_documented_example_file_parses_to_the_defaults() -> None:
    # docs/config.toml is the example shown in docs/config.md: it must stay loadable.
    assert load_config(REPO / "docs" / "config.toml") == Config()


def test_file_values_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'root = "/srv/lazysnap"\naddress = "/run/x.sock"\n[log]\nlevel = "DEBUG"\nformat = "text"\n'
    )
    config = load_config(path)
    assert config.root == Path("/srv/lazysnap") and config.address == Path("/run/x.sock")
    assert (config.log.level, config.log.format) == ("debug", "text")
    overridden = with_overrides(config, root="/other", log_level="error")
    assert overridden.root == Path("/other") and overridden.address == Path("/run/x.sock")
    assert overridden.log.level == "error" and overridden.log.format == "text"


def test_keep_mounted_on_stop_from_the_file_or_the_flag(tmp_path: Path) -> None:
    assert Config().lazy.keep_mounted_on_stop is False
    path = tmp_path / "config.toml"
    path.write_text("[lazy]\nkeep_mounted_on_stop = true\n")
    assert load_config(path).lazy.keep_mounted_on_stop is True
    assert with_overrides(Config(), keep_mounted_on_stop=True).lazy.keep_mounted_on_stop is True
    assert with_overrides(load_config(path)).lazy.keep_mounted_on_stop is True  # no flag given
    path.write_text('[lazy]\nkeep_mounted_on_stop = "yes"\n')
    with pytest.raises(ConfigError, match=r"lazy\.keep_mounted_on_stop"):
        load_config(path)


def test_read_deadline_from_the_file_with_the_read_path_default(tmp_path: Path) -> None:
    # The daemon hands this value to the read path; without a key both must agree.
    assert Config().lazy.read_deadline == FetchConfig().read_deadline
    path = tmp_path / "config.toml"
    path.write_text("[lazy]\nread_deadline = 2.5\n")
    assert load_config(path).lazy.read_deadline == 2.5
    path.write_text("[lazy]\nread_deadline = 45\n")
    assert load_config(path).lazy.read_deadline == 45.0


def test_long_read_bytes_from_the_file_reach_the_read_path(tmp_path: Path) -> None:
    from snapshotter.daemon.main import read_path_config  # noqa: PLC0415 (daemon imports)

    assert Config().lazy.long_read_bytes == FetchConfig().long_read_bytes == 24 << 20
    assert read_path_config(Config().lazy) == FetchConfig()
    path = tmp_path / "config.toml"
    path.write_text("[lazy]\nlong_read_bytes = 0\nread_deadline = 3\n")
    fetch = read_path_config(load_config(path).lazy)
    assert (fetch.long_read_bytes, fetch.read_deadline) == (0, 3.0)
    for bad in ("-1", "1.5", "true", '"24M"'):
        path.write_text(f"[lazy]\nlong_read_bytes = {bad}\n")
        with pytest.raises(ConfigError, match=r"lazy\.long_read_bytes: expected an integer"):
            load_config(path)


def test_exec_prefetch_keys_reach_the_read_path(tmp_path: Path) -> None:
    from snapshotter.daemon.main import read_path_config  # noqa: PLC0415 (daemon imports)

    defaults = FetchConfig()
    lazy = Config().lazy
    assert (lazy.exec_prefetch_depth, lazy.exec_prefetch_concurrency) == (
        defaults.exec_prefetch_depth, defaults.exec_prefetch_concurrency
    ) == (2, 4)
    path = tmp_path / "config.toml"
    path.write_text("[lazy]\nexec_prefetch_depth = 0\nexec_prefetch_concurrency = 9\n")
    fetch = read_path_config(load_config(path).lazy)
    assert (fetch.exec_prefetch_depth, fetch.exec_prefetch_concurrency) == (0, 9)
    assert not fetch.exec_prefetch
    for key, bad in (("exec_prefetch_depth", "9"), ("exec_prefetch_concurrency", "-1"),
                     ("exec_prefetch_depth", "true")):
        path.write_text(f"[lazy]\n{key} = {bad}\n")
        with pytest.raises(ConfigError, match=rf"lazy\.{key}: expected an integer"):
            load_config(path)


def test_every_lazy_key_is_documented_with_its_default() -> None:
    # docs/config.md's table and docs/config.toml name each [lazy] key, so none goes unseen.
    table = (REPO / "docs" / "config.md").read_text()
    example = (REPO / "docs" / "config.toml").read_text()
    for name in LazyConfig.__dataclass_fields__:
        assert f"| `lazy.{name}` |" in table, name
        assert f"\n{name} = " in example, name


@pytest.mark.parametrize("value", ["0", "-1", "601", "true", '"20"', "nan", "inf"])
def test_bad_read_deadlines_name_the_key(tmp_path: Path, value: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[lazy]\nread_deadline = {value}\n")
    with pytest.raises(ConfigError, match=r"lazy\.read_deadline: expected seconds"):
        load_config(path)


def test_missing_default_file_means_defaults_but_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('roots = "/x"', "unknown configuration keys: roots"),
        ("root = 5", "root: expected a str"),
        ('root = "relative/dir"', "must be an absolute path"),
        ('[log]\nlevel = "loud"', "log.level: 'loud' is not one of"),
        ('[log]\ncolour = true', "log.colour"),
        ("root = ", "not valid TOML"),
        ("[registry]\nmirror_first_byte_timeout = 0", "registry.mirror_first_byte_timeout"),
        ('[registry]\nmirror_first_byte_timeout = "5s"', "expected seconds"),
        ("[registry]\nfirst_byte = 1", "registry.first_byte"),
        # Found by fuzzing: arrays nested past the recursion limit escaped as RecursionError.
        ("[lazy]\nx = " + "[" * 3000 + "]" * 3000, "not valid TOML"),
    ],
)
def test_bad_files_name_the_key_and_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert str(path) in str(raised.value)


def test_bad_flag_values_are_errors() -> None:
    with pytest.raises(ConfigError, match="--root"):
        with_overrides(Config(), root="")
    with pytest.raises(ConfigError, match="--address"):
        with_overrides(Config(), address="relative.sock")


def test_parse_config_rejects_non_table_log() -> None:
    with pytest.raises(ConfigError, match="log: expected a dict"):
        parse_config({"log": "debug"})


def test_kata_guest_pull_from_the_file_or_the_flag(tmp_path: Path) -> None:
    assert Config().kata.guest_pull is False and Config().kata.mount_helper is None
    path = tmp_path / "config.toml"
    path.write_text('[kata]\nguest_pull = true\nmount_helper = "/opt/bin/nydus-overlayfs-x"\n')
    config = load_config(path)
    assert config.kata.guest_pull is True
    assert config.kata.mount_helper == Path("/opt/bin/nydus-overlayfs-x")
    assert with_overrides(Config(), kata_guest_pull=True).kata.guest_pull is True
    assert with_overrides(config).kata.guest_pull is True  # no flag given


@pytest.mark.parametrize("text, message", [
    ('[kata]\nguest_pull = "yes"\n', r"kata\.guest_pull"),
    ('[kata]\nmount_helper = "/usr/bin/lazysnap-mount"\n', "nydus-overlayfs"),
    ('[kata]\nmount_helper = "nydus-overlayfs-lazysnap"\n', "absolute"),
    ("[kata]\nguest_pul = true\n", r"kata\.guest_pul"),
])
def test_bad_kata_settings_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_cri_proxy_settings_from_the_file_or_the_flag(tmp_path: Path) -> None:
    assert Config().cri.image_service_address is None
    assert Config().cri.containerd_address == Path("/run/containerd/containerd.sock")
    assert Config().cri_credentials_file == Path("/run/lazysnap/cri-credentials.json")
    path = tmp_path / "c.toml"
    path.write_text('address = "/x/d.sock"\n[cri]\nimage_service_address = "/x/cri.sock"\n'
                    'containerd_address = "/c/c.sock"\n')
    config = load_config(path)
    assert config.cri.image_service_address == Path("/x/cri.sock")
    assert config.cri.containerd_address == Path("/c/c.sock")
    assert config.cri_credentials_file == Path("/x/cri-credentials.json")
    flagged = with_overrides(config, cri_image_service="/y/cri.sock")
    assert flagged.cri.image_service_address == Path("/y/cri.sock")
    with pytest.raises(ConfigError, match=r"cri\.nope"):
        parse_config({"cri": {"nope": "x"}})
    with pytest.raises(ConfigError, match=r"cri\.credentials_file.*absolute"):
        parse_config({"cri": {"credentials_file": "rel.json"}})
    with pytest.raises(ConfigError, match="--cri-image-service"):
        with_overrides(Config(), cri_image_service="rel.sock")


def test_pull_table_and_its_bounds(tmp_path: Path) -> None:
    assert (Config().pull.parallel, Config().pull.connections) == (True, 4)
    assert Config().pull.range_size == 4 << 20
    path = tmp_path / "config.toml"
    path.write_text("[pull]\nparallel = false\nconnections = 8\nrange_size = 1048576\n")
    pull = load_config(path).pull
    assert (pull.parallel, pull.connections, pull.range_size) == (False, 8, 1 << 20)
    for bad in ("connections = 0", "connections = true", "range_size = 100", "speed = 1"):
        path.write_text(f"[pull]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"pull\."):
            load_config(path)


def test_mirror_first_byte_timeout_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[registry]\nmirror_first_byte_timeout = 1.5\n")
    assert load_config(path).registry.mirror_first_byte_timeout == 1.5
    path.write_text("[registry]\nmirror_first_byte_timeout = 2\n")
    assert load_config(path).registry.mirror_first_byte_timeout == 2.0


def test_credential_provider_settings_go_together() -> None:
    config = parse_config({"cri": {"credential_provider_config": "/etc/kubelet/providers.yaml",
                                   "credential_provider_bin_dir": "/usr/libexec/kubelet"}})
    assert config.cri.credential_provider_config == Path("/etc/kubelet/providers.yaml")
    assert config.cri.credential_provider_bin_dir == Path("/usr/libexec/kubelet")
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"cri": {"credential_provider_config": "/etc/kubelet/providers.yaml"}})
    with pytest.raises(ConfigError, match="absolute"):
        parse_config({"cri": {"credential_provider_config": "providers.yaml",
                              "credential_provider_bin_dir": "/bin"}})


def test_index_table_defaults_and_bounds(tmp_path: Path) -> None:
    index = Config().index
    assert (index.publish, index.min_layer_size, index.span_size) == (False, 10 << 20, 4 << 20)
    path = tmp_path / "config.toml"
    path.write_text("[index]\npublish = true\nmin_layer_size = 0\nspan_size = 65536\n")
    index = load_config(path).index
    assert (index.publish, index.min_layer_size, index.span_size) == (True, 0, 65536)
    for bad in ("publish = 1", "min_layer_size = -1", "min_layer_size = true",
                "span_size = 1000", "span_size = 2147483648", "push = true"):
        path.write_text(f"[index]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"index\."):
            load_config(path)


def test_index_defaults_are_lazysnap_index_s() -> None:
    from snapshotter.convert.soci import DEFAULT_MIN_LAYER_SIZE, IndexOptions  # noqa: PLC0415

    assert Config().index.min_layer_size == DEFAULT_MIN_LAYER_SIZE
    assert Config().index.span_size == IndexOptions().span_size


def test_fuse_passthrough_is_off_by_default_and_takes_auto(tmp_path: Path) -> None:
    assert Config().fuse.passthrough == "off"
    path = tmp_path / "config.toml"
    path.write_text('[fuse]\npassthrough = "AUTO"\n')
    assert load_config(path).fuse.passthrough == "auto"
    for bad in ('passthrough = "on"', "passthrough = true", 'passthru = "auto"'):
        path.write_text(f"[fuse]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"fuse\.pass"):
            load_config(path)
    table = (REPO / "docs" / "config.md").read_text()
    assert "| `fuse.passthrough` | `off` |" in table


def test_background_yield_from_the_file_reaches_the_read_path(tmp_path: Path) -> None:
    from snapshotter.daemon.main import read_path_config  # noqa: PLC0415 (daemon imports)

    assert Config().lazy.background_yield == FetchConfig().background_yield == 3.0
    path = tmp_path / "config.toml"
    for text, expected in (("0", 0.0), ("1.5", 1.5), ("10", 10.0)):
        path.write_text(f"[lazy]\nbackground_yield = {text}\n")
        assert read_path_config(load_config(path).lazy).background_yield == expected
    for bad in ("-1", "601", "true", '"3s"'):
        path.write_text(f"[lazy]\nbackground_yield = {bad}\n")
        with pytest.raises(ConfigError, match=r"lazy\.background_yield: expected seconds"):
            load_config(path)


def test_background_ranges_from_the_file_reaches_the_read_path(tmp_path: Path) -> None:
    from snapshotter.daemon.main import read_path_config  # noqa: PLC0415 (daemon imports)

    assert Config().lazy.background_ranges == FetchConfig().background_ranges == 8
    assert read_path_config(Config().lazy).background_ranges == 8
    path = tmp_path / "config.toml"
    for value in (1, 3, 64):
        path.write_text(f"[lazy]\nbackground_ranges = {value}\n")
        assert read_path_config(load_config(path).lazy).background_ranges == value
    for bad in ("0", "-2", "1025", "true", '"8"'):
        path.write_text(f"[lazy]\nbackground_ranges = {bad}\n")
        with pytest.raises(ConfigError, match=r"lazy\.background_ranges: expected an integer"):
            load_config(path)


def test_nearby_fetch_is_off_unless_the_file_turns_it_on(tmp_path: Path) -> None:
    from snapshotter.daemon.main import read_path_config  # noqa: PLC0415 (daemon imports)

    assert read_path_config(Config().lazy).nearby_span == FetchConfig().nearby_span == 0
    path = tmp_path / "config.toml"
    path.write_text("[lazy]\nnearby_fetch = true\n")
    assert read_path_config(load_config(path).lazy).nearby_span == 512 << 10
    path.write_text('[lazy]\nnearby_fetch = "yes"\n')
    with pytest.raises(ConfigError, match=r"lazy\.nearby_fetch"):
        load_config(path)


def test_profile_table_defaults_and_bounds(tmp_path: Path) -> None:
    profile = Config().profile
    assert (profile.prefetch, profile.publish, profile.record_seconds, profile.max_files) == (
        True, False, 10.0, 4096)
    path = tmp_path / "config.toml"
    path.write_text("[profile]\nprefetch = false\npublish = true\nrecord_seconds = 2\n"
                    "max_files = 10\n")
    profile = load_config(path).profile
    assert (profile.prefetch, profile.publish, profile.record_seconds, profile.max_files) == (
        False, True, 2.0, 10)
    for bad in ("prefetch = 1", "publish = \"yes\"", "record_seconds = 0",
                "record_seconds = 601", "max_files = 0", "max_files = 5000", "record = true"):
        path.write_text(f"[profile]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"profile\."):
            load_config(path)
