"""A lazy read the registry refuses fails (EIO in the filesystem) with a log line naming the
image, not only the blob digest the filesystem knows."""

from __future__ import annotations

import logging

import pytest
import trio

from fusefs import BlobReader
from registry import AuthenticationError, AuthorizationError, NotFoundError
from snapshotter.remote.refused_reads import LOG_INTERVAL_SECONDS, ImageNamedBlob

DIGEST = "sha256:" + "a" * 64
IMAGE = "reg.io/team/app:1"


class Refusing:
    size = 100
    digest = DIGEST

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.forgot = 0

    async def read_at(self, offset: int, length: int) -> bytes:
        if self.error is not None:
            raise self.error
        return b"x" * length

    def forget_redirect(self) -> None:
        self.forgot += 1


def _read(blob: BlobReader) -> bytes:
    async def main() -> bytes:
        return await blob.read_at(0, 4)

    return trio.run(main)


@pytest.mark.parametrize("error", [AuthenticationError("blob", status=401),
                                   AuthorizationError("blob", status=403)])
def test_a_refusal_is_logged_with_the_image_and_raised(
    caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    now = [0.0]
    blob = ImageNamedBlob(Refusing(error), IMAGE, clock=lambda: now[0])
    assert isinstance(blob, BlobReader)
    with caplog.at_level(logging.ERROR), pytest.raises(type(error)):
        _read(blob)
    (record,) = caplog.records
    assert record.image == IMAGE and record.digest == DIGEST  # type: ignore[attr-defined]
    with pytest.raises(type(error)):
        _read(blob)
    assert len(caplog.records) == 1  # a burst of refused reads logs once per interval
    now[0] += LOG_INTERVAL_SECONDS
    with pytest.raises(type(error)):
        _read(blob)
    assert len(caplog.records) == 2


def test_other_errors_and_good_reads_pass_through(caplog: pytest.LogCaptureFixture) -> None:
    inner = Refusing(NotFoundError("gone", status=404))
    blob = ImageNamedBlob(inner, IMAGE)
    with pytest.raises(NotFoundError):
        _read(blob)
    assert caplog.records == []
    inner.error = None
    assert _read(blob) == b"xxxx"
    blob.forget_redirect()
    assert inner.forgot == 1 and blob.size == 100 and blob.digest == DIGEST
