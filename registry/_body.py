"""Reading a response body with a cap: a server must not make us hold more than we asked for.

A body is read chunk by chunk and abandoned as soon as it passes its limit. A registry, or any
proxy between us and it, that sends a gigabyte too much then costs one chunk, not a gigabyte.
"""

from __future__ import annotations

import httpx

from registry.errors import ProtocolError
from registry.redact import safe_url

MAX_MANIFEST_SIZE = 8 * 1024 * 1024  # twice what the distribution spec asks registries to accept
MAX_SMALL_BODY = 1024 * 1024  # token answers, upload answers and other JSON replies


class OversizedBodyError(ProtocolError):
    """A body longer than its limit, whether announced so or found so while reading."""


def announced_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body if it is at most ``limit`` bytes; ``OversizedBodyError`` otherwise.

    A ``Content-Length`` above the limit fails before any byte is read.
    """
    announced = announced_length(response)
    if announced is not None and announced > limit:
        raise OversizedBodyError(
            f"{what}: the server announced {announced} bytes, limit {limit}",
            url=safe_url(response.url),
        )
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            # The caller closes the response, which drops the connection with the rest unread.
            raise OversizedBodyError(
                f"{what}: the body passed the limit of {limit} bytes", url=safe_url(response.url)
            )
        chunks.append(chunk)
    return b"".join(chunks)
