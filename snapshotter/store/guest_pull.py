"""Kata guest image pulling: the one mount that tells Kata's runtime to pull the image in the guest.

Kata's Go shim leaves a container's rootfs to the guest only when the rootfs is a single mount
whose type is ``fuse.`` and a name whose base name starts with ``nydus-overlayfs``
(``IsNydusRootFSType``). The runtime then reads the ``io.katacontainers.volume=`` option: a
base64 ``KataVirtualVolume`` of type ``image_guest_pull``. The host still mounts the same mount
(containerd resolves named users and copies image volumes through it) with lazysnap's helper,
which drops the volume option and mounts the overlay. See docs/kata.md.

The JSON written here and the checks in ``parse_volume`` follow kata-containers
``src/runtime/virtcontainers/types/virtual_volume.go`` and ``src/libs/kata-types/src/mount.rs``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from snapshotter.labels import CRI_IMAGE_REF, CRI_MANIFEST_DIGEST, KATA_GUEST_PULL

VOLUME_OPTION = "io.katacontainers.volume="
VOLUME_TYPE = "image_guest_pull"
HELPER_NAME_PREFIX = "nydus-overlayfs"
MOUNT_SOURCE = "overlay"
# runtime-rs rejects an empty source; Kata's Go runtime replaces it with the image named by the
# container's annotations anyway. Used when no layer of the chain names its image.
PLACEHOLDER_SOURCE = "unknown-image-reference"
# What the guest is told about the image, besides its reference. Kept short: the whole option
# list travels through mount.fuse's argv and the shim's logs.
METADATA_LABELS = (CRI_IMAGE_REF, CRI_MANIFEST_DIGEST)


class VolumeError(ValueError):
    """A volume option Kata would refuse; the message says why."""


def mount_type(helper: str) -> str:
    """``fuse.<helper>``, refused unless Kata's shim would recognise it."""
    if not PurePosixPath(helper).name.startswith(HELPER_NAME_PREFIX):
        raise ValueError(
            f"mount helper {helper!r}: Kata recognises only helpers whose base name starts "
            f"with {HELPER_NAME_PREFIX!r}"
        )
    if "," in helper or not helper.strip():
        raise ValueError(f"mount helper {helper!r} is not a usable name")
    return "fuse." + helper


@dataclass(frozen=True, slots=True)
class GuestPull:
    """The store option: on when set, with the mount type containerd will use."""

    mount_type: str


def encode_volume(source: str, metadata: Mapping[str, str]) -> str:
    """The base64 JSON ``KataVirtualVolume`` for an image pulled by the guest."""
    volume = {
        "volume_type": VOLUME_TYPE,
        "source": source or PLACEHOLDER_SOURCE,
        "options": [f"{key}={value}" for key, value in sorted(metadata.items())],
        # Always an object: Kata's Go runtime adds the container's annotations into it.
        "image_pull": {"metadata": dict(sorted(metadata.items()))},
    }
    return base64.b64encode(json.dumps(volume, separators=(",", ":")).encode()).decode()


def chain_volume(chain: Sequence[Mapping[str, str]]) -> str:
    """The volume for a chain (labels nearest first): the nearest guest-pull layer names the
    image; a chain with none (a parent made elsewhere, or before the mode was on) gets the
    placeholder source and no metadata."""
    for labels in chain:
        if labels.get(KATA_GUEST_PULL) and labels.get(CRI_IMAGE_REF):
            metadata = {key: labels[key] for key in METADATA_LABELS if labels.get(key)}
            return encode_volume(labels[CRI_IMAGE_REF], metadata)
    return encode_volume(PLACEHOLDER_SOURCE, {})


def parse_volume(encoded: str) -> dict[str, Any]:
    """Decode a volume and check it as Kata does; raise VolumeError naming the rule broken."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise VolumeError("the volume is not standard base64") from None
    try:
        volume = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VolumeError("the volume is not JSON") from None
    if not isinstance(volume, dict):
        raise VolumeError("the volume is not a JSON object")
    volume_type = volume.get("volume_type")
    if not isinstance(volume_type, str) or not volume_type:
        raise VolumeError("the volume has no volume_type")
    source = volume.get("source", "")
    if not isinstance(source, str):
        raise VolumeError("the volume's source is not a string")
    options = volume.get("options", [])
    if options is not None and not (
        isinstance(options, list) and all(isinstance(o, str) for o in options)
    ):
        raise VolumeError("the volume's options are not a list of strings")
    image_pull = volume.get("image_pull")
    if image_pull is not None:
        if not isinstance(image_pull, dict):
            raise VolumeError("the volume's image_pull is not an object")
        metadata = image_pull.get("metadata")
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise VolumeError("the volume's image_pull.metadata is not an object of strings")
    if volume_type == VOLUME_TYPE:
        if not source:
            raise VolumeError("a guest-pull volume needs a source (the image reference)")
        if image_pull is None:
            raise VolumeError("a guest-pull volume needs image_pull.metadata")
    return volume
