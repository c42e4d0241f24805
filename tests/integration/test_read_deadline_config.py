"""The operator's ``[lazy] read_deadline`` reaches the read path of a running daemon.

A lazy image comes through the fault proxy; once its layer is attached, every blob request
stalls. A read must then fail with EIO after the configured deadline, not the built-in one,
and the daemon's log says which deadline it applied.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs import FetchConfig
from snapshotter.daemon import keeper as fuse_keeper
from tests.integration.registry_support import fault_proxy as fp
from tests.integration.test_remote_snapshots import (
    LazyImage,
    _chain_ids,
    _expect_remote,
    _mount,
    _prepare,
)
from tests.support import oci_image as oci
from tests.support.daemon import running_daemon
from tests.support.docker_registry import RunningRegistry

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.registry]

CONFIGURED_DEADLINE = 2
CONTENT = bytes(range(256)) * 1024


@pytest.fixture
def mounted() -> Iterator[list[Path]]:
    targets: list[Path] = []
    yield targets
    for target in reversed(targets):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_configured_read_deadline_fails_a_stalled_read_with_eio(
    short_tmp: Path, docker_registry: RunningRegistry, mounted: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert FetchConfig().read_deadline != CONFIGURED_DEADLINE  # else the test proves nothing
    tar = oci.TarBuilder().dir("data").file("data/blob.bin", CONTENT).tar()
    layer = oci.seekable_layer(tar, "estargz", chunk_size=64 << 10)
    layout = tmp_path_factory.mktemp("deadline-layout")
    digest = oci.write_layout(layout, (layer,))
    pushed = f"{docker_registry.host}/deadline/image:latest"
    oci.push_layout(layout, "latest", pushed)
    config = short_tmp / "lazysnap.toml"
    config.write_text(
        f"[lazy]\nbackground_fetch = false\nread_deadline = {CONFIGURED_DEADLINE}\n"
    )
    root = short_tmp / "d" / "root"
    try:
        with fp.run_fault_proxy(docker_registry.host) as proxy, \
                running_daemon(short_tmp / "d", extra_args=["--config", str(config)]) as daemon:
            image = LazyImage(pushed.replace(docker_registry.host, proxy.host, 1), digest,
                              (layer,), _chain_ids([layer.diff_id]), (tar,))
            _expect_remote(daemon, image, 0, "")
            target = short_tmp / "container"
            _mount(_prepare(daemon, "container", image.chain[0], {}), target, mounted)
            # The layer is attached and its index loaded: from now on its blob never answers.
            proxy.inject(*(fp.stall(60.0) for _ in range(50)))
            with pytest.raises(OSError) as raised:
                (target / "data" / "blob.bin").read_bytes()
            assert raised.value.errno == errno.EIO
            assert f"no bytes after {CONFIGURED_DEADLINE} s (read deadline)" in daemon.log()
            proxy.clear()
    finally:
        fuse_keeper.retire(fuse_keeper.keeper_socket(root))
