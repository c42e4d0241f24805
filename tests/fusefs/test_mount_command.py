"""``lazysnap mount`` argument and input errors (no FUSE needed: they fail before mounting)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from fusefs.formats import write_estargz
from snapshotter.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["mount", *args])
    return code, capsys.readouterr().err


def test_bad_image_reference(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "Bad::Ref", str(tmp_path))
    assert code == 2 and "invalid reference" in err


def test_unreachable_registry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, "127.0.0.1:1/x/y:z", str(tmp_path), "--hosts-dir", str(tmp_path))
    assert code == 1 and "127.0.0.1:1/x/y:z" in err and "connect" in err.lower()


def test_missing_source(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run(capsys, str(tmp_path))
    assert code == 2 and "--blob PATH" in err


def test_missing_blob_and_bad_mountpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run(capsys, "--blob", str(tmp_path / "nope"), str(tmp_path))
    assert code == 2 and "blob not found" in err
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    code, err = run(capsys, "--blob", str(blob), str(tmp_path / "missing-dir"))
    assert code == 2 and "mountpoint is not a directory" in err
    code, err = run(capsys, "--blob", str(blob), "ref", str(tmp_path))
    assert code == 2 and "not both" in err


def test_a_blob_that_is_not_a_seekable_layer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blob = tmp_path / "garbage"
    blob.write_bytes(os.urandom(4096))
    code, err = run(capsys, "--blob", str(blob), str(tmp_path))
    assert code == 1 and str(blob) in err and "error" in err


def test_a_wrong_toc_digest_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        info = tarfile.TarInfo("hello")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    tar.seek(0)
    blob = tmp_path / "layer.esgz"
    with open(blob, "wb") as out:
        write_estargz(tar, out)
    code, err = run(
        capsys, "--blob", str(blob), "--toc-digest", "sha256:" + "0" * 64, str(tmp_path)
    )
    assert code == 1 and "digest" in err.lower()
