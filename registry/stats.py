"""Counters of the registry client, read out by the daemon's metrics.

Plain integers in dicts of fixed keys, bumped on the event loop's thread: cheap enough for every
ranged read. The daemon reads them on that same thread, so it never sees a half-made update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ORIGIN = "origin"
MIRROR = "mirror"
SOURCES = (ORIGIN, MIRROR)

FOUND = "found"
NONE = "none"
ERROR = "error"
CREDENTIAL_RESULTS = (FOUND, NONE, ERROR)

OK = "ok"
REFUSED = "refused"
TOKEN_RESULTS = (OK, REFUSED, ERROR)


@dataclass(slots=True)
class RegistryStats:
    """What the client fetched and how its credential lookups and token fetches went."""

    blob_reads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    blob_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    credential_lookups: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(CREDENTIAL_RESULTS, 0)
    )
    token_fetches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_RESULTS, 0))

    def blob_read(self, mirror: bool, size: int) -> None:
        source = MIRROR if mirror else ORIGIN
        self.blob_reads[source] += 1
        self.blob_bytes[source] += size

    def copy(self) -> RegistryStats:
        return RegistryStats(
            dict(self.blob_reads), dict(self.blob_bytes), dict(self.credential_lookups),
            dict(self.token_fetches),
        )
