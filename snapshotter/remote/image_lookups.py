"""One registry lookup per image at a time, its answer cached: what SOCI indexes and startup
profiles share.

Concurrent callers for one image join the lookup in flight. A found answer is kept while the
image stays among the ``cache_size`` most recently asked. "Nothing" is not final: a failed
lookup is tried again after ``failed_seconds`` (a registry hiccup should not decide for the
life of the daemon) and a clean "there is none" after ``absent_seconds`` (someone may publish
one later without changing the image).

Every lookup that goes to the registry ends in one of ``RESULTS``, counted in ``results`` for
the daemon's ``lazysnap_image_lookups_total``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from registry import Reference

log = logging.getLogger(__name__)

T = TypeVar("T")

FOUND = "found"
ABSENT = "absent"  # the registry answered: there is none
FAILED = "failed"  # the registry failed or took too long: asked again sooner
RESULTS = (FOUND, ABSENT, FAILED)


@dataclass(slots=True)
class _Lookup(Generic[T]):
    done: trio.Event
    found: T | None = None
    # trio time after which the answer is looked up again; None keeps it.
    expires_at: float | None = None

    def expired(self) -> bool:
        return (
            self.done.is_set()
            and self.expires_at is not None
            and trio.current_time() >= self.expires_at
        )


@dataclass(frozen=True, slots=True)
class LookupPolicy:
    what: str  # names the lookup in log lines, e.g. "soci index"
    errors: tuple[type[Exception], ...]  # failures that mean "nothing, for now"
    timeout_seconds: float
    failed_seconds: float
    absent_seconds: float
    cache_size: int


def image_key(ref: Reference, manifest_digest: str) -> str:
    return f"{ref.domain}/{ref.path}@{manifest_digest}"


class ImageLookups(Generic[T]):
    """Answers of one kind per image, each looked up at most once while it stays cached."""

    def __init__(self, policy: LookupPolicy) -> None:
        self._policy = policy
        self._lookups: OrderedDict[str, _Lookup[T]] = OrderedDict()
        self.results = dict.fromkeys(RESULTS, 0)  # lookups that went to the registry
        self._running = 0

    @property
    def requests(self) -> int:
        """Lookups that went to the registry, finished or not."""
        return sum(self.results.values()) + self._running


    def __contains__(self, key: str) -> bool:
        return key in self._lookups

    async def get(
        self,
        ref: Reference,
        manifest_digest: str,
        find: Callable[[], Awaitable[T | None]],
        on_found: Callable[[T], None],
    ) -> T | None:
        """The cached answer for the image, else ``find()``'s; ``on_found`` is called once per
        lookup that found something, for its log line."""
        policy = self._policy
        failures: tuple[type[Exception], ...] = (*policy.errors, trio.TooSlowError)
        key = image_key(ref, manifest_digest)
        lookup = self._lookups.get(key)
        if lookup is not None and lookup.expired():
            del self._lookups[key]
            lookup = None
        if lookup is not None:
            self._lookups.move_to_end(key)
            await lookup.done.wait()
            return lookup.found
        lookup = self._lookups[key] = _Lookup(trio.Event())
        if len(self._lookups) > policy.cache_size:
            self._lookups.popitem(last=False)
        result = FAILED  # also when cancelled or when ``find`` raises something unexpected
        self._running += 1
        try:
            lookup.expires_at = trio.current_time() + policy.failed_seconds
            with trio.fail_after(policy.timeout_seconds):
                lookup.found = await find()
            lookup.expires_at = (
                None if lookup.found is not None else trio.current_time() + policy.absent_seconds
            )
            result = ABSENT if lookup.found is None else FOUND
        except failures as exc:
            log.warning(
                "%s lookup failed image=%s manifest=%s error=%s: %s",
                policy.what, ref.path, manifest_digest, type(exc).__name__, exc,
            )
        finally:
            self._running -= 1
            self.results[result] += 1
            lookup.done.set()
        if lookup.found is not None:
            on_found(lookup.found)
        return lookup.found
