"""The per-host back-off state machine, on a fake clock."""

from __future__ import annotations

import pytest

from registry import NotFoundError, RegistryError, RegistryTimeoutError, ServerError
from registry.errors import AuthenticationError, DigestMismatchError, RangeNotSatisfiableError
from registry.health import HostHealth, is_host_fault
from registry.hosts import RegistryHost

MIRROR_A = RegistryHost("https://a.test/v2", is_mirror=True)
MIRROR_B = RegistryHost("https://b.test/v2", is_mirror=True)
ORIGIN = RegistryHost("https://reg.test/v2")
HOSTS = [MIRROR_A, MIRROR_B, ORIGIN]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(hosts: list[RegistryHost]) -> list[str]:
    return [h.netloc for h in hosts]


def test_a_failed_host_goes_last_and_comes_back_after_its_backoff() -> None:
    clock = FakeClock()
    health = HostHealth(5.0, 60.0, clock)
    assert names(health.order(HOSTS)) == ["a.test", "b.test", "reg.test"]
    health.failed(MIRROR_A, RegistryTimeoutError("no answer"))
    assert health.in_backoff("a.test")
    assert names(health.order(HOSTS)) == ["b.test", "reg.test", "a.test"]
    clock.now += 4.9
    assert names(health.order(HOSTS)) == ["b.test", "reg.test", "a.test"]
    clock.now += 0.2
    # Back-off over: one probe gets it in its place, the others meanwhile still skip it.
    assert names(health.order(HOSTS)) == ["a.test", "b.test", "reg.test"]
    assert names(health.order(HOSTS)) == ["b.test", "reg.test", "a.test"]
    health.succeeded(MIRROR_A)
    assert not health.in_backoff("a.test")
    assert names(health.order(HOSTS)) == ["a.test", "b.test", "reg.test"]


def test_backoff_doubles_with_failures_in_a_row_up_to_the_cap() -> None:
    clock = FakeClock()
    health = HostHealth(5.0, 30.0, clock)
    waits = []
    for _ in range(5):
        health.failed(MIRROR_A, ServerError("503", status=503))
        start = clock.now
        while health.in_backoff("a.test"):
            clock.now += 0.5
        waits.append(clock.now - start)
        health.order(HOSTS)  # the probe
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0]


def test_a_failed_probe_extends_the_backoff_and_a_success_resets_it() -> None:
    clock = FakeClock()
    health = HostHealth(5.0, 60.0, clock)
    health.failed(MIRROR_A, ServerError("503", status=503))
    clock.now += 5.0
    assert health.order(HOSTS)[0] is MIRROR_A  # probing
    health.failed(MIRROR_A, ServerError("503", status=503))
    clock.now += 9.9
    assert health.in_backoff("a.test")
    clock.now += 0.1
    assert not health.in_backoff("a.test")
    health.succeeded(MIRROR_A)
    health.failed(MIRROR_A, ServerError("503", status=503))
    clock.now += 5.0
    assert not health.in_backoff("a.test")  # counted from one again


def test_answers_that_are_not_the_hosts_fault_do_not_back_it_off() -> None:
    clock = FakeClock()
    health = HostHealth(5.0, 60.0, clock)
    health.failed(MIRROR_A, ServerError("503", status=503))
    # A 404 is a working host without this blob: it clears the back-off like a success.
    health.failed(MIRROR_A, NotFoundError("blob unknown", status=404))
    assert not health.in_backoff("a.test")
    for error in (
        AuthenticationError("401", status=401),
        RangeNotSatisfiableError("416", status=416),
    ):
        health.failed(MIRROR_B, error)
        assert not health.in_backoff("b.test")


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (RegistryTimeoutError("slow"), True),
        (ServerError("502", status=502), True),
        (DigestMismatchError("wrong bytes"), True),
        (NotFoundError("404", status=404), False),
        (AuthenticationError("401", status=401), False),
    ],
)
def test_which_errors_are_the_hosts_fault(error: RegistryError, fault: bool) -> None:
    assert is_host_fault(error) is fault


def test_backoff_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        HostHealth(0, 10)
    with pytest.raises(ValueError):
        HostHealth(10, 5)


def test_failures_of_requests_sent_before_the_backoff_count_once() -> None:
    clock = FakeClock()
    health = HostHealth(5.0, 60.0, clock)
    for _ in range(3):  # three reads in flight when the mirror died
        health.failed(MIRROR_A, RegistryTimeoutError("no answer"))
    clock.now += 5.0
    assert not health.in_backoff("a.test")  # one failure: 5 s, not 20 s
    health.order(HOSTS)  # the probe
    health.failed(MIRROR_A, RegistryTimeoutError("no answer"))  # a request from before
    health.failed(MIRROR_A, RegistryTimeoutError("no answer"))
    clock.now += 9.9
    assert health.in_backoff("a.test")
    clock.now += 0.1
    assert not health.in_backoff("a.test")  # two failures in all: 10 s
