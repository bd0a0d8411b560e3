"""The s3 tier's circuit breaker, on a hand-driven clock."""

from __future__ import annotations

from kvbm_tiers_s3.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_consecutive_failures() -> None:
    b = CircuitBreaker(failures=3, cooldown_s=1.0, clock=Clock())
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    assert b.opens == 1 and b.rejections == 1


def test_a_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failures=2, clock=Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == CLOSED


def test_half_open_lets_exactly_one_trial_through() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.failure()
    clock.t = 1.0
    assert b.state == HALF_OPEN
    assert b.allow()
    assert not b.allow()  # the trial is in flight


def test_successful_trial_closes_the_breaker() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, clock=clock)
    b.failure()
    clock.t = 1.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()


def test_failed_trial_reopens_for_twice_as_long_up_to_the_cap() -> None:
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=1.0, max_cooldown_s=3.0, clock=clock)
    b.failure()
    for opened_at, cooldown in ((0.0, 1.0), (1.0, 2.0), (3.0, 3.0), (6.0, 3.0)):
        clock.t = opened_at + cooldown - 0.01
        assert not b.allow()
        clock.t = opened_at + cooldown
        assert b.allow()
        b.failure()
    assert b.state == OPEN
