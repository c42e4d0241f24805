"""A layer Prepare that is not served lazily is counted by one of a few reasons and logged as a
``remote_fallback`` event."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest

from registry import RegistryClient
from snapshotter.remote import fallback
from snapshotter.remote.layers import LazyLayers
from snapshotter.store.remote import AttachedLayer, RemoteLayerError
from tests.integration.fuse_support import trio_test
from tests.snapshotter.remote.test_hops import IMAGE, _labels

DIGEST = "sha256:" + "d" * 64


def _layers(tmp_path: Path) -> LazyLayers:
    # No filesystem and no registry are reached before these fallbacks.
    return LazyLayers(object(), RegistryClient(), lambda layer_id: tmp_path / layer_id)  # type: ignore[arg-type]


def _events(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "remote_fallback"]


@trio_test
async def test_a_layer_without_a_toc_falls_back_as_not_lazy_format(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    layers = _layers(tmp_path)
    caplog.set_level(logging.INFO)
    with pytest.raises(RemoteLayerError, match="no SOCI index"):
        await layers.mount(_labels("sha256:" + "c" * 64, DIGEST, {}), "r1")
    assert layers.fallbacks == {**dict.fromkeys(fallback.REASONS, 0),
                                fallback.NOT_LAZY_FORMAT: 1}
    [event] = _events(caplog)
    assert (event.reason, event.image, event.digest) == (  # type: ignore[attr-defined]
        fallback.NOT_LAZY_FORMAT, IMAGE, DIGEST)


@trio_test
async def test_labels_without_a_target_fall_back_as_labels_invalid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    layers = _layers(tmp_path)
    caplog.set_level(logging.INFO)
    with pytest.raises(RemoteLayerError):
        await layers.mount({}, "r1")
    assert layers.fallbacks[fallback.LABELS_INVALID] == 1
    [event] = _events(caplog)
    assert (event.image, event.digest) == ("", "")  # type: ignore[attr-defined]


@trio_test
async def test_an_unexpected_failure_is_counted_as_internal_and_still_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    layers = _layers(tmp_path)

    async def broken(labels: Mapping[str, str], layer_id: str) -> AttachedLayer:
        raise KeyError("a bug")

    monkeypatch.setattr(layers, "_mount", broken)
    with pytest.raises(KeyError):
        await layers.mount({}, "r1")
    assert layers.fallbacks[fallback.INTERNAL_ERROR] == 1
    assert sum(layers.fallbacks.values()) == 1

