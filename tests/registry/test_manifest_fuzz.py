"""Fuzzing manifests and indexes: only ManifestError escapes parse_manifest, whatever it
accepts is well formed, and platform selection over it fails only with its own errors."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from registry import manifest as m
from registry.errors import ManifestError, PlatformNotFoundError
from registry.reference import validate_digest
from tests.fuzzing import fuzz_settings

SHA = "sha256:" + "0123456789abcdef" * 4
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
media_types = st.one_of(
    st.sampled_from(sorted(m.INDEX_TYPES | m.MANIFEST_TYPES) + list(m.DOCKER_SCHEMA1)),
    st.sampled_from(["application/vnd.oci.image.layer.v1.tar+gzip", "", "x/y"]),
    scalars,
)
digests = st.one_of(
    st.just(SHA), st.just(SHA), st.sampled_from([SHA.upper(), "sha256:12", "md5:00", "", "x"]),
    scalars,
)  # fmt: skip
string_maps = st.one_of(
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
    scalars,
)
platforms = st.one_of(
    st.fixed_dictionaries(
        {"os": st.sampled_from(["linux", "windows", "Linux"]),
         "architecture": st.sampled_from(["amd64", "arm64", "arm", "aarch64", "x86_64", "386"])},
        optional={"variant": st.one_of(st.sampled_from(["v7", "v8", "v6", ""]), scalars),
                  "os.version": scalars},
    ),
    st.dictionaries(st.sampled_from(["os", "architecture", "variant"]), scalars, max_size=3),
    scalars,
)  # fmt: skip
descriptor = st.one_of(
    st.fixed_dictionaries(
        {"mediaType": media_types, "digest": digests,
         "size": st.one_of(st.integers(0, 2**40), st.integers(0, 2**40), scalars)},
        optional={"annotations": string_maps, "platform": platforms,
                  "urls": st.one_of(st.lists(st.text(max_size=5), max_size=2), scalars)},
    ),
    scalars,
)  # fmt: skip
documents = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), scalars),
        "mediaType": media_types,
        "config": descriptor,
        "layers": st.one_of(st.lists(descriptor, max_size=4), scalars),
        "manifests": st.one_of(st.lists(descriptor, max_size=4), scalars),
        "annotations": string_maps,
    },
)
content_types = st.one_of(
    st.none(),
    media_types.filter(lambda t: isinstance(t, str)),
    st.sampled_from([m.OCI_INDEX + "; charset=utf-8", " ; "]),
)


def encode(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode()


bodies = st.one_of(
    documents.map(encode),
    documents.map(encode).flatmap(
        lambda body: st.tuples(st.integers(0, len(body)), st.binary(max_size=4)).map(
            lambda cut: body[: cut[0]] + cut[1] + body[cut[0] + 1 :]
        )
    ),
    st.binary(max_size=40),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 5000).map(lambda depth: b'{"layers":' * depth),
)


def check_descriptor(descriptor: m.Descriptor) -> None:
    assert validate_digest(descriptor.digest) == descriptor.digest
    assert isinstance(descriptor.size, int) and descriptor.size >= 0
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in descriptor.annotations.items())


@fuzz_settings(500)
@given(body=bodies, content_type=content_types)
def test_manifests_parse_or_raise_manifest_error(body: bytes, content_type: str | None) -> None:
    try:
        parsed = m.parse_manifest(body, content_type)
    except ManifestError:
        return
    if isinstance(parsed, m.Index):
        assert parsed.media_type in m.INDEX_TYPES
        for item in parsed.manifests:
            check_descriptor(item)
        for wanted in (None, m.Platform("linux", "arm64"), m.Platform("linux", "arm", "v6")):
            with contextlib.suppress(PlatformNotFoundError):
                check_descriptor(m.select_manifest(parsed, wanted))
    else:
        assert parsed.media_type in m.MANIFEST_TYPES
        for item in (parsed.config, *parsed.layers):
            check_descriptor(item)


@fuzz_settings(300)
@given(st.one_of(
    st.lists(st.sampled_from(["linux", "amd64", "arm", "v7", "", "x/"]), max_size=4).map("/".join),
    st.text(max_size=20),
))  # fmt: skip
def test_platforms_parse_or_raise_value_error(text: str) -> None:
    try:
        platform = m.parse_platform(text)
    except ValueError:
        return
    assert m.parse_platform(str(platform)) == platform  # parsing normalises once and for all
