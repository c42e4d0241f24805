"""Startup profiles: which files an image's container read in its first seconds (pure).

A profile is one JSON blob, pushed as the single layer of an OCI artifact manifest whose
``subject`` is the image manifest, so that any later pull finds it through the referrers API
(or the referrers tag) and prefetches those files first: the read order ``convert --optimize``
bakes into an image, without rebuilding it or touching its digest or signature.

The blob (``PROFILE_MEDIA_TYPE``)::

    {"version": 1, "recordSeconds": 10.0,
     "layers": [{"digest": "sha256:<layer blob>",
                 "files": [["/usr/bin/python3.11", 3145728], ...]}]}

``files`` are in first-read order; the number after each path is how far into the file the
container read during the recording (the prefetch fetches up to there). A profile is
untrusted input written by anyone allowed to push to the repository: it only reorders fetches,
never changes a served byte (every chunk is still verified against the layer's TOC). So the
parser bounds it (``MAX_PROFILE_BYTES``, layers, files, path length) and drops any entry it
cannot use (a relative path, ``..``, NUL, a negative size) rather than failing the pull.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ARTIFACT_TYPE = "application/vnd.lazysnap.startup-profile.v1+json"
PROFILE_MEDIA_TYPE = ARTIFACT_TYPE
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
CREATED = "org.opencontainers.image.created"

MAX_PROFILE_BYTES = 1 << 20
MAX_ARTIFACT_MANIFEST_BYTES = 64 << 10
MAX_LAYERS = 256
MAX_FILES_PER_LAYER = 4096
MAX_PATH_BYTES = 4096


class ProfileError(ValueError):
    """A profile or its manifest that cannot be used at all."""


@dataclass(frozen=True, slots=True)
class ProfiledFile:
    path: str  # absolute, normalised: "/usr/bin/python3.11"
    read_bytes: int  # how far into the file the recorded run read


@dataclass(frozen=True, slots=True)
class StartupProfile:
    layers: Mapping[str, tuple[ProfiledFile, ...]]  # layer blob digest -> files in read order
    record_seconds: float = 0.0
    dropped: int = 0  # entries the parser ignored (hostile or beyond the bounds)

    def files_of(self, layer_digest: str) -> tuple[ProfiledFile, ...]:
        return self.layers.get(layer_digest, ())


def clean_path(path: object) -> str | None:
    """``path`` as an absolute normalised path, or None when it is not one a profile may name."""
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        return None
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return None
    parts = [part for part in path.split("/") if part and part != "."]
    if not parts or ".." in parts:
        return None
    return "/" + "/".join(parts)


def parse(body: bytes) -> StartupProfile:
    """The profile in ``body``; ProfileError if it is not one. Unusable entries are dropped."""
    if len(body) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile of {len(body)} bytes is larger than {MAX_PROFILE_BYTES}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProfileError("profile is not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ProfileError("profile is not a version 1 startup profile")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ProfileError("profile has no layers list")
    seconds = doc.get("recordSeconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
        seconds = 0.0
    dropped = max(0, len(raw_layers) - MAX_LAYERS)
    layers: dict[str, tuple[ProfiledFile, ...]] = {}
    for raw in raw_layers[:MAX_LAYERS]:
        digest = raw.get("digest") if isinstance(raw, dict) else None
        files = raw.get("files") if isinstance(raw, dict) else None
        if not _is_digest(digest) or not isinstance(files, list) or digest in layers:
            dropped += 1
            continue
        assert isinstance(digest, str)
        kept, lost = _files(files)
        layers[digest] = kept
        dropped += lost
    return StartupProfile(layers, float(seconds), dropped)


def _files(raw: Sequence[Any]) -> tuple[tuple[ProfiledFile, ...], int]:
    kept: list[ProfiledFile] = []
    seen: set[str] = set()
    dropped = max(0, len(raw) - MAX_FILES_PER_LAYER)
    for item in raw[:MAX_FILES_PER_LAYER]:
        if not isinstance(item, list) or len(item) != 2:
            dropped += 1
            continue
        path, size = clean_path(item[0]), item[1]
        if (path is None or path in seen or isinstance(size, bool) or not isinstance(size, int)
                or not 0 <= size < 1 << 62):
            dropped += 1
            continue
        seen.add(path)
        kept.append(ProfiledFile(path, size))
    return tuple(kept), dropped


def _is_digest(value: object) -> bool:
    if not isinstance(value, str):
        return False
    algorithm, _, hex_part = value.partition(":")
    return (algorithm == "sha256" and len(hex_part) == 64
            and all(c in "0123456789abcdef" for c in hex_part))


def render(profile: StartupProfile) -> bytes:
    """The blob of ``profile``, bounded as ``parse`` bounds it (files past the bounds are left
    out, so what a node publishes is what every reader keeps)."""
    layers: list[dict[str, Any]] = []
    for digest, profiled in list(profile.layers.items())[:MAX_LAYERS]:
        kept: list[list[object]] = [[f.path, f.read_bytes] for f in profiled[:MAX_FILES_PER_LAYER]
                if clean_path(f.path) == f.path and f.read_bytes >= 0]
        layers.append({"digest": digest, "files": kept})
    doc = {"version": 1, "recordSeconds": profile.record_seconds, "layers": layers}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    while len(body) > MAX_PROFILE_BYTES and any(layer["files"] for layer in layers):
        # Too many long paths: drop the last-read half of the longest list until it fits.
        longest = max(layers, key=lambda layer: len(layer["files"]))
        files = longest["files"]
        assert isinstance(files, list)
        del files[len(files) // 2:]
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return body


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def artifact_manifest(
    profile_body: bytes, subject_media_type: str, subject_digest: str, subject_size: int,
    created: str,
) -> bytes:
    """The OCI manifest that carries ``profile_body`` and refers to the image manifest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha256(EMPTY_CONFIG),
                   "size": len(EMPTY_CONFIG), "data": "e30="},
        "layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": sha256(profile_body),
                    "size": len(profile_body)}],
        "subject": {"mediaType": subject_media_type, "digest": subject_digest,
                    "size": subject_size},
        "annotations": {CREATED: created},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class ProfileBlob:
    digest: str
    size: int


def profile_blob_of(manifest: bytes, subject_digest: str) -> ProfileBlob:
    """The profile blob an artifact manifest carries; ProfileError unless the manifest is a
    startup profile whose subject is ``subject_digest`` (a referrers list is written by anyone
    who may push, and lists what it likes)."""
    if len(manifest) > MAX_ARTIFACT_MANIFEST_BYTES:
        raise ProfileError("profile manifest is too large")
    try:
        doc = json.loads(manifest)
    except (ValueError, RecursionError) as exc:
        raise ProfileError("profile manifest is not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE:
        raise ProfileError("not a startup profile manifest")
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        raise ProfileError("profile manifest's subject is another manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise ProfileError("profile manifest must carry exactly one blob")
    blob = layers[0]
    digest, size = blob.get("digest"), blob.get("size")
    if blob.get("mediaType") != PROFILE_MEDIA_TYPE or not _is_digest(digest):
        raise ProfileError("profile manifest's blob is not a startup profile")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_PROFILE_BYTES:
        raise ProfileError("profile blob has an unusable size")
    assert isinstance(digest, str)
    return ProfileBlob(digest, size)


def add_to_referrers_tag(existing: bytes | None, manifest: bytes, digest: str) -> bytes:
    """The image index under the referrers tag (registries without the referrers API): what it
    listed, without entries that are not descriptors, plus this profile once."""
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if existing is not None:
        try:
            loaded = json.loads(existing)
        except (ValueError, RecursionError) as exc:
            raise ProfileError("referrers tag index is not valid JSON") from exc
        if not isinstance(loaded, dict):
            raise ProfileError("referrers tag index is not an object")
        doc = loaded
    entries = doc.get("manifests")
    entries = entries if isinstance(entries, list) else []
    kept = [e for e in entries if isinstance(e, dict) and e.get("digest") != digest]
    entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
             "artifactType": ARTIFACT_TYPE}
    created = json.loads(manifest).get("annotations", {}).get(CREATED)
    if isinstance(created, str):
        entry["annotations"] = {CREATED: created}
    doc["manifests"] = [*kept, entry]
    doc["schemaVersion"] = 2
    doc["mediaType"] = OCI_INDEX
    return json.dumps(doc, separators=(",", ":")).encode()
