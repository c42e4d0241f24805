"""ImageLookups: the cached per-image lookup SOCI indexes and startup profiles share."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from registry import Reference, parse_reference
from snapshotter.remote.image_lookups import ImageLookups, LookupPolicy


class Missing(Exception):
    pass


POLICY = LookupPolicy("thing", (Missing,), timeout_seconds=5, failed_seconds=30,
                      absent_seconds=300, cache_size=2)


def _ref(name: str) -> Reference:
    return parse_reference(f"reg.test/{name}:1")


def test_concurrent_callers_join_one_lookup_and_found_is_reported_once() -> None:
    finds: list[str] = []
    reported: list[str] = []

    async def find() -> str:
        finds.append("a")
        await trio.sleep(1)
        return "answer"

    async def main() -> list[str | None]:
        lookups: ImageLookups[str] = ImageLookups(POLICY)
        answers: list[str | None] = []

        async def ask() -> None:
            answers.append(await lookups.get(_ref("a"), "sha256:m", find, reported.append))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
        answers.append(await lookups.get(_ref("a"), "sha256:m", find, reported.append))
        assert lookups.requests == 1
        return answers

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == ["answer"] * 4
    assert finds == ["a"] and reported == ["answer"]


def test_the_least_recently_asked_image_is_forgotten_past_the_cache_size() -> None:
    async def main() -> int:
        lookups: ImageLookups[str] = ImageLookups(POLICY)

        async def found() -> str:
            return "x"

        for name in ("a", "b", "a", "c", "a", "b"):
            await lookups.get(_ref(name), "sha256:m", found, lambda _: None)
        return lookups.requests

    # a, b, (a cached), c evicts b, (a cached), b again: 4 lookups.
    assert trio.run(main) == 4


def test_every_lookup_that_went_to_the_registry_is_counted_by_result() -> None:
    async def main() -> dict[str, int]:
        lookups: ImageLookups[str] = ImageLookups(POLICY)

        async def found() -> str:
            return "x"

        async def absent() -> None:
            return None

        async def missing() -> str:
            raise Missing("registry down")

        async def slow() -> str:
            await trio.sleep(60)
            return "late"

        for name, find in (("a", found), ("a", found), ("b", absent), ("c", missing),
                           ("d", slow)):
            await lookups.get(_ref(name), "sha256:m", find, lambda _: None)
        return lookups.results

    # The second ask of "a" is answered from the cache; "d" times out after 5 s.
    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == {
        "found": 1, "absent": 1, "failed": 2,
    }


def test_a_listed_failure_means_nothing_for_now_and_others_propagate() -> None:
    async def main() -> None:
        lookups: ImageLookups[str] = ImageLookups(POLICY)

        async def missing() -> str:
            raise Missing("not there")

        async def broken() -> str:
            raise ValueError("a bug")

        assert await lookups.get(_ref("a"), "sha256:m", missing, lambda _: None) is None
        with pytest.raises(ValueError, match="a bug"):
            await lookups.get(_ref("b"), "sha256:m", broken, lambda _: None)
        # A lookup that raised is counted too, so the failed count shows bugs as well.
        assert lookups.results == {"found": 0, "absent": 0, "failed": 2}

    trio.run(main)
