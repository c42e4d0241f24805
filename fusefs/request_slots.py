"""The range requests one blob may have in flight, readers first (issue 13).

A plain limiter is first come, first served: background fetch, file completion and readahead
could take every slot of a blob, and a container's next read miss then waited for a background
range to end (issue 13 reports readers of a gcc start waiting 3.6 s in all for slots). With the
default limits a blob's slots rarely fill: in the startup benchmark's gcc, imports and
read-everything runs on a 100 Mbit/s link at most 5 of 8 were held. This bounds the worst case.

So background work holds at most ``capacity - 1`` slots, and one is always left for a reader.
When a slot frees, a request some reader waits on is granted before background ones, first
come, first served within each class. Whether a reader waits on a request can change while it
waits (a reader catches up with a readahead range), so urgency is asked when slots are handed
out, and ``reconsider`` hands out the reserved slot to a request that just became urgent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio


class _Waiter:
    __slots__ = ("background", "granted", "urgent")

    def __init__(self, urgent: Callable[[], bool]) -> None:
        self.urgent = urgent
        self.granted = trio.Event()
        self.background = False  # the class it was granted as, for the release


class RequestSlots:
    """At most ``capacity`` requests at once, at most ``capacity - 1`` of them background."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        # With one slot there is nothing to reserve: background work would never run.
        self._background_cap = max(1, capacity - 1)
        self._held = 0
        self._background_held = 0
        self._waiting: list[_Waiter] = []  # in arrival order

    @property
    def idle(self) -> bool:
        """Nobody holds or waits for a slot."""
        return not self._held and not self._waiting

    @property
    def held(self) -> int:
        return self._held

    @property
    def background_held(self) -> int:
        return self._background_held

    @asynccontextmanager
    async def hold(self, urgent: Callable[[], bool]) -> AsyncIterator[None]:
        """Hold a slot for one request. ``urgent()`` tells whether a reader waits on it."""
        waiter = _Waiter(urgent)
        self._waiting.append(waiter)
        self._grant()
        try:
            await waiter.granted.wait()
        except BaseException:
            # Cancelled while waiting, or just after the grant: never keep a slot nobody uses.
            if waiter.granted.is_set():
                self._release(waiter)
            else:
                self._waiting.remove(waiter)
            raise
        try:
            yield
        finally:
            self._release(waiter)

    def reconsider(self) -> None:
        """A waiting request may have become urgent: it may take the slot kept for readers."""
        self._grant()

    def _release(self, waiter: _Waiter) -> None:
        self._held -= 1
        if waiter.background:
            self._background_held -= 1
        self._grant()

    def _grant(self) -> None:
        while self._held < self._capacity and self._waiting:
            chosen = next((w for w in self._waiting if w.urgent()), None)
            if chosen is None:
                if self._background_held >= self._background_cap:
                    return  # the last slot stays free for a reader
                chosen = self._waiting[0]
                chosen.background = True
                self._background_held += 1
            self._waiting.remove(chosen)
            self._held += 1
            chosen.granted.set()
