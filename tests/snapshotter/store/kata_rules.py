"""Kata's own rules for a guest-pull rootfs, ported into the tests (no code of theirs is reused).

Sources, kata-containers main:
- ``parse_kata_virtual_volume``: ``ParseKataVirtualVolume`` and ``KataVirtualVolume.IsValid`` in
  ``src/runtime/virtcontainers/types/virtual_volume.go`` (Go's base64.StdEncoding and
  encoding/json decoding into the struct's field types);
- ``check_runtime_rs``: ``KataVirtualVolume::validate`` in ``src/libs/kata-types/src/mount.rs``
  (an ``image_guest_pull`` volume needs a non-empty source);
- ``check_go_runtime_use``: ``handleImageGuestPullBlockVolume`` in
  ``src/runtime/virtcontainers/kata_agent.go`` writes the container's annotations into
  ``ImagePull.Metadata``, so both must be there (a nil pointer or a nil map would panic);
- ``is_nydus_rootfs_type``: ``IsNydusRootFSType`` in the same kata_agent.go, which
  ``checkAndMount`` (``src/runtime/pkg/containerd-shim-v2/create.go``) asks of a single rootfs
  mount before leaving it to the guest.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from typing import Any

# The struct's JSON field names. Go matches object keys to them case-insensitively and ignores
# the others; a value of the wrong JSON type is an Unmarshal error, null leaves the zero value.
_STRING_FIELDS = ("volume_type", "source", "fs_type")


class KataRejects(Exception):
    """Kata would refuse the volume or the mount."""


def _field(document: dict[str, Any], name: str) -> Any:
    found = None
    for key, value in document.items():
        if key == name:
            return value
        if key.lower() == name and found is None:
            found = value
    return found


def _go_string(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise KataRejects(f"json: cannot unmarshal into Go struct field {name} of type string")
    return value


def parse_kata_virtual_volume(option: str) -> dict[str, Any]:
    """What Go's ParseKataVirtualVolume accepts, as the fields the runtime then reads."""
    # Go's StdEncoding: the standard alphabet with padding; it skips \r and \n only.
    cleaned = option.replace("\r", "").replace("\n", "")
    try:
        raw = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KataRejects("KataVirtualVolume base64 decoding err") from exc
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KataRejects("KataVirtualVolume json unmarshal err") from exc
    if not isinstance(document, dict):
        raise KataRejects("KataVirtualVolume json unmarshal err: not an object")
    volume: dict[str, Any] = {
        name: _go_string(_field(document, name), name) for name in _STRING_FIELDS
    }
    options = _field(document, "options")
    if options is not None and not (
        isinstance(options, list) and all(isinstance(o, str) for o in options)
    ):
        raise KataRejects("json: cannot unmarshal options into []string")
    volume["options"] = options or []
    image_pull = _field(document, "image_pull")
    if image_pull is not None:
        if not isinstance(image_pull, dict):
            raise KataRejects("json: cannot unmarshal image_pull into ImagePullVolume")
        metadata = _field(image_pull, "metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise KataRejects("json: cannot unmarshal metadata into map[string]string")
        image_pull = {"metadata": metadata}
    volume["image_pull"] = image_pull
    # IsValid: a volume type, and an image_pull (when present) with a non-nil metadata map.
    if not volume["volume_type"]:
        raise KataRejects("KataVirtualVolume is not correct: no volume_type")
    if image_pull is not None and image_pull["metadata"] is None:
        raise KataRejects("KataVirtualVolume is not correct: image_pull.metadata is nil")
    return volume


def check_runtime_rs(volume: dict[str, Any]) -> None:
    if volume["volume_type"] == "image_guest_pull" and not volume["source"]:
        raise KataRejects("missing image reference for guest pulling volume")


def check_go_runtime_use(volume: dict[str, Any]) -> None:
    if volume["image_pull"] is None or volume["image_pull"]["metadata"] is None:
        raise KataRejects("handleImageGuestPullBlockVolume would write into a nil map")


def is_nydus_rootfs_type(mount_type: str) -> bool:
    if not mount_type.startswith("fuse."):
        return False
    # Go's path.Base drops trailing slashes first.
    name = mount_type[len("fuse."):].rstrip("/")
    return posixpath.basename(name).startswith("nydus-overlayfs")


def kata_accepts(volume_option: str) -> dict[str, Any]:
    """Every rule above, for one ``io.katacontainers.volume=`` value."""
    volume = parse_kata_virtual_volume(volume_option)
    check_runtime_rs(volume)
    check_go_runtime_use(volume)
    return volume
