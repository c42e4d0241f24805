"""How the parallel pull downloads a layer blob (no imports, so that the CLI may read it before
it loads the registry client)."""

from __future__ import annotations

from dataclasses import dataclass

# Measured on the startup benchmark's 65 MB layer (docs/pull.md): 4 connections of 4 MiB ranges
# fill a 100 Mbit/s, 20 ms link and keep loopback transfers ahead of decompression.
DEFAULT_CONNECTIONS = 4
DEFAULT_RANGE_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FetchSettings:
    connections: int = DEFAULT_CONNECTIONS  # range requests in flight at once, for all layers
    range_size: int = DEFAULT_RANGE_SIZE  # bytes per range request
