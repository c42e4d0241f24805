"""Tunables of the registry client: timeouts, retries, pooling."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # between two received chunks
    request_timeout: float = 60.0  # total for one attempt of a request, headers and body
    max_attempts: int = 4  # per request, counting the first
    backoff_initial: float = 0.2  # the first retry waits up to this long (full jitter)
    backoff_max: float = 5.0
    retry_after_max: float = 30.0  # a Retry-After longer than this is cut to it
    min_download_rate: float = 64 * 1024  # bytes/s: bounds a whole-blob download in total
    credentials_ttl: float = 300.0  # how long looked-up credentials are reused
    redirect_ttl: float = 300.0  # how long a blob's redirect target is reused
    no_range_ttl: float = 60.0  # how long a host that ignored a Range header is believed to
    max_connections: int = 64  # per TLS identity
    # Requests in flight to one registry host, attempts of every caller together. Hosts share
    # a pool, so a host whose answers stall must leave connections to the others.
    max_requests_per_host: int = 32
    # A mirror must start answering within this long, or the next host is asked. Mirrors get
    # one attempt per request: the hosts after them are the retry.
    mirror_first_byte_timeout: float = 5.0
    # A host that failed is tried after the others for this long, doubled after each failure
    # in a row up to the maximum (see registry/health.py).
    host_backoff_initial: float = 5.0
    host_backoff_max: float = 120.0
    # A host that lacked a blob (404) or could not serve a range of it yet (a pull-through
    # cache still storing it) is asked after the others for that blob for this long.
    blob_miss_ttl: float = 30.0
    http2: bool = True  # negotiated by ALPN on https; plain http stays HTTP/1.1
    upload_chunk_size: int = 8 * 1024 * 1024
    user_agent: str = "lazysnap/0.1"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_requests_per_host < 1:
            raise ValueError("max_requests_per_host must be at least 1")
        for name in (
            "connect_timeout",
            "read_timeout",
            "request_timeout",
            "redirect_ttl",
            "no_range_ttl",
            "min_download_rate",
            "mirror_first_byte_timeout",
            "host_backoff_initial",
            "blob_miss_ttl",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.host_backoff_max < self.host_backoff_initial:
            raise ValueError("host_backoff_max must be at least host_backoff_initial")
