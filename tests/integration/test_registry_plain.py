"""The registry client against Debian's docker-registry over plain HTTP on loopback."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from registry import (
    HostsConfig,
    NotFoundError,
    RegistryClient,
    parse_platform,
    parse_reference,
)
from registry.manifest import sha256_digest
from snapshotter.labels import (
    ESTARGZ_TOC_DIGEST,
    ZSTD_CHUNKED_CHECKSUM,
    ZSTD_CHUNKED_POSITION,
)
from tests.integration.registry_support.fault_proxy import run_fault_proxy
from tests.integration.registry_support.helpers import lazysnap, run, write_hosts_toml
from tests.integration.registry_support.images import (
    LayerSpec,
    push_image,
    push_index,
    random_blob,
    tar_gz,
)
from tests.support.docker_registry import RunningRegistry
from tests.support.ports import free_port

pytestmark = pytest.mark.registry

SHA = "sha256:" + "ab" * 32


def client(hosts_dir: Path) -> RegistryClient:
    return RegistryClient(HostsConfig(hosts_dir))


def test_push_pull_round_trip(docker_registry: RunningRegistry, tmp_path: Path) -> None:
    big = random_blob(3 * 1024 * 1024 + 17, seed=1)
    small = tar_gz({"etc/hello": b"hello world\n"})
    name = f"{docker_registry.host}/roundtrip/app:v1"

    async def main() -> None:
        async with client(tmp_path / "hosts") as c:
            pushed = await push_image(
                c, name, [LayerSpec(small), LayerSpec(big)], chunk_size=1024 * 1024
            )
            ref = parse_reference(name)
            image = await c.resolve_image(ref)
            assert image.digest == pushed.manifest_digest == image.manifest_digest
            assert [layer.digest for layer in image.manifest.layers] == [
                sha256_digest(small),
                sha256_digest(big),
            ]
            # whole blobs, streamed and verified
            dest = tmp_path / "big.blob"
            assert await c.download_blob(ref, sha256_digest(big), dest) == len(big)
            assert dest.read_bytes() == big
            assert await c.fetch_blob(ref, pushed.config_digest) != b""
            # ranged reads, including the edges
            blob = await c.open_blob(ref, sha256_digest(big))
            assert blob.size == len(big)
            rng = random.Random(7)
            for _ in range(20):
                offset = rng.randrange(len(big))
                length = rng.randrange(1, min(300_000, len(big) - offset) + 1)
                assert await blob.read_at(offset, length) == big[offset : offset + length]
            assert await blob.read_at(0, len(big)) == big
            assert await blob.read_at(len(big) - 1, 1) == big[-1:]

    run(main)


def test_index_platform_selection(docker_registry: RunningRegistry, tmp_path: Path) -> None:
    base = f"{docker_registry.host}/multi/app"

    async def main() -> None:
        async with client(tmp_path) as c:
            amd = await push_image(
                c, f"{base}:amd", [LayerSpec(tar_gz({"a": b"amd"}))], arch="amd64"
            )
            arm = await push_image(
                c, f"{base}:arm", [LayerSpec(tar_gz({"a": b"arm"}))], arch="arm64"
            )
            index_digest = await push_index(
                c, f"{base}:multi", [(amd, "linux", "amd64"), (arm, "linux", "arm64/v8")]
            )
            ref = parse_reference(f"{base}:multi")
            picked = await c.resolve_image(ref, parse_platform("linux/arm64"))
            assert picked.digest == index_digest
            assert picked.manifest_digest == arm.manifest_digest
            picked = await c.resolve_image(
                ref.with_digest(index_digest), parse_platform("linux/amd64")
            )
            assert picked.manifest_digest == amd.manifest_digest

    run(main)


def test_not_found_and_cross_repo_mount(docker_registry: RunningRegistry, tmp_path: Path) -> None:
    data = random_blob(100_000, seed=3)

    async def main() -> None:
        async with client(tmp_path) as c:
            with pytest.raises(NotFoundError) as info:
                await c.resolve(parse_reference(f"{docker_registry.host}/nothing/here:v1"))
            assert info.value.details and info.value.details[0].code in {
                "NAME_UNKNOWN",
                "MANIFEST_UNKNOWN",
            }
            source = parse_reference(f"{docker_registry.host}/mount/source:v1")
            target = parse_reference(f"{docker_registry.host}/mount/target:v1")
            with pytest.raises(NotFoundError):
                await c.stat_blob(source, sha256_digest(data))
            await c.push_blob(source, data)
            with pytest.raises(NotFoundError):
                await c.stat_blob(target, sha256_digest(data))
            await c.push_blob(target, data, mount_from=source)
            assert await c.stat_blob(target, sha256_digest(data)) == len(data)

    run(main)


def test_mirror_fails_first_then_upstream_answers(
    docker_registry: RunningRegistry, fresh_registry: RunningRegistry, tmp_path: Path
) -> None:
    name = f"{docker_registry.host}/mirrored/app:v1"
    dead = f"127.0.0.1:{free_port()}"
    hosts_dir = tmp_path / "hosts"
    write_hosts_toml(
        hosts_dir,
        docker_registry.host,
        f'server = "{docker_registry.url}"\n'
        f'[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n'
        f'[host."{fresh_registry.url}"]\n  capabilities = ["pull", "resolve"]\n',
    )
    layer = random_blob(200_000, seed=5)

    async def main() -> None:
        async with RegistryClient(HostsConfig(tmp_path / "nohosts")) as direct:
            await push_image(direct, name, [LayerSpec(layer)])
        async with client(hosts_dir) as c:
            image = await c.resolve_image(parse_reference(name))
            blob = await c.open_blob(parse_reference(name), image.manifest.layers[0].digest)
            assert await blob.read_at(1000, 5000) == layer[1000:6000]

    run(main)
    assert "/v2/mirrored/app/manifests/v1" in fresh_registry.log()  # the empty mirror was asked


def test_inspect_cli(docker_registry: RunningRegistry, tmp_path: Path) -> None:
    name = f"{docker_registry.host}/inspect/app:v1"
    layers = [
        LayerSpec(tar_gz({"a": b"1"})),
        LayerSpec(tar_gz({"b": b"2"}), annotations={ESTARGZ_TOC_DIGEST: SHA}),
        LayerSpec(
            random_blob(1000, seed=9),
            media_type="application/vnd.oci.image.layer.v1.tar+zstd",
            annotations={ZSTD_CHUNKED_CHECKSUM: SHA, ZSTD_CHUNKED_POSITION: "10:20:30:1"},
        ),
    ]

    async def main() -> str:
        async with client(tmp_path) as c:
            return (await push_image(c, name, layers)).manifest_digest

    digest = run(main)
    result = lazysnap("inspect", name, "--json", "--hosts-dir", str(tmp_path / "none"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["digest"] == digest
    assert [layer["format"] for layer in report["layers"]] == [None, "estargz", "zstd:chunked"]
    assert report["layers"][1]["annotations"][ESTARGZ_TOC_DIGEST] == SHA
    text = lazysnap("inspect", name, env={"LAZYSNAP_HOSTS_DIR": str(tmp_path / "none")})
    assert text.returncode == 0, text.stderr
    assert digest in text.stdout and "3 (2 lazily pullable)" in text.stdout
    assert "lazy: estargz" in text.stdout and "lazy: zstd:chunked" in text.stdout

    missing = lazysnap(
        "inspect", f"{docker_registry.host}/inspect/app:nope", "--hosts-dir", str(tmp_path)
    )
    assert missing.returncode == 1 and "NotFoundError" in missing.stderr
    bad = lazysnap("inspect", "Busybox", "--hosts-dir", str(tmp_path))
    assert bad.returncode == 2 and "invalid reference" in bad.stderr
    bad_platform = lazysnap("inspect", name, "--platform", "linux", "--hosts-dir", str(tmp_path))
    assert bad_platform.returncode == 2 and "os/arch" in bad_platform.stderr


def test_ipv6_literal_host(docker_registry: RunningRegistry, tmp_path: Path) -> None:
    """An IPv6 loopback reference ([::1]:PORT/...) goes over IPv6 (through a pass-through proxy)."""
    layer = random_blob(100_000, seed=61)
    with run_fault_proxy(docker_registry.host, bind="::1") as proxy:
        name = f"{proxy.host}/ipv6/app:v1"
        assert name.startswith("[::1]:")

        async def main() -> None:
            async with client(tmp_path) as c:
                pushed = await push_image(c, name, [LayerSpec(layer)])
                image = await c.resolve_image(parse_reference(name))
                assert image.digest == pushed.manifest_digest
                blob = await c.open_blob(parse_reference(name), image.manifest.layers[0].digest)
                assert await blob.read_at(99_000, 1000) == layer[99_000:]

        run(main)
        assert proxy.requests > 0
