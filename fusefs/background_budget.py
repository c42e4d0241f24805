"""The node-wide bound on background fetch: how many background ranges all layers hold at once.

Every layer's background fetch takes a place here for each range it starts and gives it back
once the range's chunks are decoded (or it failed), so the place covers the range on the link
and in memory. Places go to the layer attached first: with twenty images pulled at once, the
first layers are fetched whole before the later ones start, instead of all twenty fetching at
once while their containers start (benchmarks/scale.py, CRI arms: that cost ~12 s of daemon CPU
and made every FUSE read of the node 5-7x slower). One layer alone holds no more than it did
on its own (``2 * background_concurrency`` ranges in memory), so one or two images fetch as
before.

While the node is crowded (many readers waiting on the link at once, anywhere), the bound
drops to ``crowded_limit``: background fetch of all layers together goes on with a trickle,
so it neither starves nor takes the CPU and the link from the readers.
"""

from __future__ import annotations

import heapq
import itertools
import math

import trio


class BudgetPlace:
    """One range's place in the budget; ``release`` gives it back, once however often called."""

    __slots__ = ("_budget",)

    def __init__(self, budget: BackgroundBudget) -> None:
        self._budget: BackgroundBudget | None = budget

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back()


class BackgroundBudget:
    """At most ``limit`` places held at once (``crowded_limit`` while crowded), handed out
    lowest ``order`` first (attach order), first come first served within one order."""

    def __init__(self, limit: int, crowded_limit: int = 1) -> None:
        if limit < 1 or crowded_limit < 1:
            raise ValueError("background budget limits must be at least 1")
        self.limit = limit
        self.crowded_limit = min(crowded_limit, limit)
        self._held = 0
        self._waiting: list[tuple[int, int]] = []  # (order, arrival): a heap
        self._arrivals = itertools.count()
        self._changed = trio.Event()
        self._crowded_until = -float("inf")

    @property
    def held(self) -> int:
        return self._held

    def crowded(self, until: float) -> None:
        """The node is crowded until ``until`` (a trio clock time; ``math.inf`` while the crowd
        lasts): hold at most ``crowded_limit`` places till then."""
        self._crowded_until = until
        self._wake()  # waiters look again, and wait for the new end

    def current_limit(self) -> int:
        if trio.current_time() < self._crowded_until:
            return self.crowded_limit
        return self.limit

    async def acquire(self, order: int) -> BudgetPlace:
        """Wait for a place: no waiter of a lower order (or of the same order and earlier)
        before this one, and fewer than the current limit held."""
        ticket = (order, next(self._arrivals))
        heapq.heappush(self._waiting, ticket)
        try:
            while self._waiting[0] != ticket or self._held >= self.current_limit():
                changed = self._changed
                # The crowded limit ends by time alone: look again then.
                crowded_until = self._crowded_until
                if crowded_until <= trio.current_time():
                    crowded_until = math.inf
                with trio.move_on_at(crowded_until):
                    await changed.wait()
        except BaseException:
            self._waiting.remove(ticket)
            heapq.heapify(self._waiting)
            self._wake()  # the next waiter may be first now
            raise
        heapq.heappop(self._waiting)
        self._held += 1
        self._wake()  # the next waiter may fit as well
        return BudgetPlace(self)

    def _give_back(self) -> None:
        self._held -= 1
        self._wake()

    def _wake(self) -> None:
        # Every waiter looks again; those that still may not go wait on a new event.
        self._changed.set()
        self._changed = trio.Event()
