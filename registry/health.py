"""Per-host health: a host that failed is tried last for a while, longer after each failure.

A dead mirror must not cost every read a connection attempt or a first-byte deadline, so after
a failure it goes behind the healthy hosts for a back-off that doubles with each failure in a
row, up to a cap. It is never dropped: a request that no healthy host could serve still asks
it, and once its back-off has passed one request tries it first again. A success clears it.

Pure state with an injected clock, so the state machine is tested without sleeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from registry.errors import (
    DigestMismatchError,
    ProtocolError,
    RegistryError,
    ServerError,
    TransportError,
)
from registry.hosts import RegistryHost

log = logging.getLogger(__name__)

# What says the host itself is unwell, not that it lacks one blob or refuses one client: it is
# down or slow, answers 5xx or garbage, or sends bytes that fail verification. A 404 is normal
# for a peer-to-peer cache that has not seen the blob yet, and a pull-through cache answers a
# range of a blob it has not stored yet with the whole blob (distribution's proxy does); both
# are about one blob. 401/403 belong to the credentials, 416 to the range asked.
_HOST_FAULTS = (TransportError, ServerError, ProtocolError, DigestMismatchError)


def is_host_fault(error: RegistryError) -> bool:
    """Whether ``error`` should put its host in back-off."""
    return isinstance(error, _HOST_FAULTS)


@dataclass(slots=True)
class _Backoff:
    failures: int  # in a row
    until: float  # monotonic time before which the host is tried last
    probing: bool = False  # one request was let through after the back-off


class HostHealth:
    """Which hosts are in back-off, keyed by ``host[:port]``."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("back-off needs 0 < initial <= maximum")
        self._initial = initial
        self._maximum = maximum
        self._clock = clock
        self._state: dict[str, _Backoff] = {}

    def __repr__(self) -> str:
        return f"HostHealth(in_backoff={sorted(self._state)})"

    def in_backoff(self, netloc: str) -> bool:
        state = self._state.get(netloc)
        return state is not None and self._clock() < state.until

    def order(self, hosts: Sequence[RegistryHost]) -> list[RegistryHost]:
        """``hosts`` with those in back-off moved to the end, each group in its own order.

        A host whose back-off has passed keeps its place for one probe. Its back-off is renewed
        at once, so requests that start while the probe is on their way skip it too.
        """
        ready: list[RegistryHost] = []
        waiting: list[RegistryHost] = []
        now = self._clock()
        for host in hosts:
            state = self._state.get(host.netloc)
            if state is None:
                ready.append(host)
            elif now < state.until:
                waiting.append(host)
            else:
                state.until = now + self._delay(state.failures)
                state.probing = True
                log.info("registry host-probe host=%s failures=%d", host.netloc, state.failures)
                ready.append(host)
        return ready + waiting

    def succeeded(self, host: RegistryHost) -> None:
        if self._state.pop(host.netloc, None) is not None:
            log.info("registry host-recovered host=%s", host.netloc)

    def failed(self, host: RegistryHost, error: RegistryError) -> None:
        """Put ``host`` in back-off if ``error`` is its own fault. Any other error is an
        answer from a working host, so it counts as a success."""
        if not is_host_fault(error):
            self.succeeded(host)
            return
        state = self._state.get(host.netloc)
        now = self._clock()
        if state is not None and now < state.until and not state.probing:
            # A request sent before the host went into back-off, failing the same way: the
            # failure is known already, and a burst of them must not count as many.
            return
        failures = 1 if state is None else state.failures + 1
        delay = self._delay(failures)
        self._state[host.netloc] = _Backoff(failures, now + delay)
        log.warning(
            "registry host-backoff host=%s failures=%d seconds=%.1f error=%s",
            host.netloc,
            failures,
            delay,
            type(error).__name__,
        )

    def _delay(self, failures: int) -> float:
        return float(min(self._maximum, self._initial * 2 ** min(failures - 1, 32)))
