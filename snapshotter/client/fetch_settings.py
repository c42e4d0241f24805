"""How the parallel pull downloads a layer blob (no imports, so that the CLI may read it before
it loads the registry client)."""

from __future__ import annotations

from dataclasses import dataclass

# Chosen, not yet swept by measurement: 4 ranges of 4 MiB in flight keep about 16 MiB moving,
# several round trips' worth on a 100 Mbit/s, 20 ms link, while each request stays small
# enough to retry cheaply. benchmarks/full_pull.py is the place to tune them on an idle machine.
DEFAULT_CONNECTIONS = 4
DEFAULT_RANGE_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FetchSettings:
    connections: int = DEFAULT_CONNECTIONS  # range requests in flight at once, for all layers
    range_size: int = DEFAULT_RANGE_SIZE  # bytes per range request
