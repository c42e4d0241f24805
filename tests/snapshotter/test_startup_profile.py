"""Startup profile documents: what ``parse`` keeps and drops, bounds, round trips."""

from __future__ import annotations

import json

import pytest

from snapshotter import startup_profile as sp

A = "sha256:" + "a" * 64


def doc(files: object, **extra: object) -> bytes:
    return json.dumps({"version": 1, "layers": [{"digest": A, "files": files}], **extra}).encode()


def test_hostile_paths_are_dropped_and_the_rest_kept_in_order() -> None:
    profile = sp.parse(doc([["/usr/bin/python3", 10], ["../../etc/shadow", 1], ["/a/../b", 1],
                            ["relative", 1], ["/x\u0000y", 1], ["/ok//./dir/", 5], [5, 5],
                            ["/neg", -1], ["/bool", True], ["/usr/bin/python3", 99], "flat",
                            ["/", 1]]))
    assert profile.files_of(A) == (sp.ProfiledFile("/usr/bin/python3", 10),
                                   sp.ProfiledFile("/ok/dir", 5))
    assert profile.dropped == 10


@pytest.mark.parametrize("body", [b"", b"[]", b"{}", b'{"version": 2, "layers": []}',
                                  b'{"version": 1}', b"\xff", b"[" * 100_000])
def test_what_is_not_a_profile_is_a_clear_error(body: bytes) -> None:
    with pytest.raises(sp.ProfileError):
        sp.parse(body)


def test_bounds() -> None:
    with pytest.raises(sp.ProfileError, match="larger"):
        sp.parse(b" " * (sp.MAX_PROFILE_BYTES + 1))
    many = sp.parse(doc([[f"/f{n}", 1] for n in range(sp.MAX_FILES_PER_LAYER + 10)]))
    assert len(many.files_of(A)) == sp.MAX_FILES_PER_LAYER and many.dropped == 10
    assert sp.clean_path("/" + "x" * sp.MAX_PATH_BYTES) is None


def test_render_round_trips_and_stays_within_the_bound() -> None:
    files = tuple(sp.ProfiledFile(f"/{'d' * 400}/{n}", n) for n in range(sp.MAX_FILES_PER_LAYER))
    profile = sp.StartupProfile({A: files, "sha256:" + "b" * 64: files[:3]}, 10.0)
    body = sp.render(profile)
    assert len(body) <= sp.MAX_PROFILE_BYTES
    parsed = sp.parse(body)
    kept = parsed.files_of(A)
    assert kept == files[: len(kept)] and 0 < len(kept) < len(files)  # the earliest kept
    assert parsed.files_of("sha256:" + "b" * 64) == files[:3]
    small = sp.StartupProfile({A: files[:2]}, 3.0)
    assert sp.parse(sp.render(small)) == small


def test_artifact_manifest_and_its_checks() -> None:
    body = sp.render(sp.StartupProfile({A: (sp.ProfiledFile("/x", 1),)}))
    subject = "sha256:" + "c" * 64
    manifest = sp.artifact_manifest(body, sp.OCI_MANIFEST, subject, 123, "2026-12-04T00:00:00Z")
    blob = sp.profile_blob_of(manifest, subject)
    assert blob == sp.ProfileBlob(sp.sha256(body), len(body))
    with pytest.raises(sp.ProfileError, match="subject"):
        sp.profile_blob_of(manifest, "sha256:" + "d" * 64)
    listing = json.loads(sp.add_to_referrers_tag(None, manifest, "sha256:" + "e" * 64))
    again = json.loads(sp.add_to_referrers_tag(json.dumps(listing).encode(), manifest,
                                               "sha256:" + "e" * 64))
    assert listing == again and len(again["manifests"]) == 1
    assert again["manifests"][0]["artifactType"] == sp.ARTIFACT_TYPE
