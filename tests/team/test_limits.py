"""Per-member limits with a fake wall clock: each enforced, and released."""

from __future__ import annotations

import calendar

import pytest

from ccx_proxy.errors import BudgetExhausted, RateLimited
from ccx_proxy.team.limits import Limiter
from ccx_proxy.team.members import Limits, Member


class Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOON = calendar.timegm((2026, 11, 30, 12, 0, 0))  # the last day of a month, UTC


def member(**limits: float) -> Member:
    return Member(name="alice", key_prefix="ccx-abcd…", limits=Limits(**limits))  # type: ignore[arg-type]


def test_no_limits_costs_nothing() -> None:
    limiter = Limiter(Wall(NOON))
    plain = member()
    assert not plain.limited
    for _ in range(1000):
        limiter.admit(plain)
    assert limiter.active("alice") == 0


def test_rpm_is_a_sliding_window() -> None:
    wall = Wall(NOON)
    limiter, alice = Limiter(wall), member(rpm=3)
    for _ in range(3):
        limiter.admit(alice)
        wall.now += 10
    with pytest.raises(RateLimited) as caught:
        limiter.admit(alice)
    error = caught.value
    assert error.status == 429 and error.retryable
    assert error.message == "rate limit of alice: 3 requests per minute; retry in 30 s"
    assert error.retry_after == pytest.approx(30)
    wall.now += 30  # the first admission leaves the window
    limiter.admit(alice)
    with pytest.raises(RateLimited):
        limiter.admit(alice)


def test_concurrency_is_released_on_every_exit() -> None:
    limiter, alice = Limiter(Wall(NOON)), member(maxConcurrent=2)
    limiter.admit(alice)
    limiter.admit(alice)
    with pytest.raises(RateLimited) as caught:
        limiter.admit(alice)
    assert "concurrency limit of alice: 2 requests at once" in caught.value.message
    assert caught.value.retry_after == 1
    limiter.release(alice)
    limiter.admit(alice)
    limiter.release(alice)
    limiter.release(alice)
    assert limiter.active("alice") == 0


def test_daily_token_budget_rolls_over_at_utc_midnight() -> None:
    wall = Wall(NOON)
    limiter, alice = Limiter(wall), member(dailyTokens=2_000_000)
    limiter.admit(alice)
    limiter.spend("alice", 2_000_001, None, wall.now)  # one request may overshoot
    with pytest.raises(BudgetExhausted) as caught:
        limiter.admit(alice)
    error = caught.value
    assert error.status == 429 and not error.retryable
    assert error.message.startswith("daily token budget of alice (2,000,000) used up; resets at 00:00 UTC")
    assert error.retry_after == pytest.approx(12 * 3600)
    wall.now += 12 * 3600  # 2026-12-01 00:00 UTC: a new day (and month)
    limiter.admit(alice)


def test_monthly_usd_budget_spans_days_and_resets_on_the_first() -> None:
    wall = Wall(calendar.timegm((2026, 11, 29, 23, 0, 0)))
    limiter, alice = Limiter(wall), member(monthlyUsd=10)
    limiter.spend("alice", 100, 6.0, wall.now)
    wall.now += 3600  # the 30th: same month
    limiter.spend("alice", 100, 4.0, wall.now)
    with pytest.raises(BudgetExhausted) as caught:
        limiter.admit(alice)
    assert caught.value.message.startswith(
        "monthly USD budget of alice ($10.00) used up; resets at 00:00 UTC on the 1st"
    )
    assert limiter.spent("alice").day_usd == pytest.approx(4.0)
    wall.now = calendar.timegm((2026, 12, 1, 0, 0, 1))
    limiter.admit(alice)


def test_budgets_loaded_from_the_database_count() -> None:
    wall = Wall(NOON)
    limiter = Limiter(wall)
    limiter.load({"alice": (1_500, 0.5, 9_000, 3.0)}, wall.now)
    with pytest.raises(BudgetExhausted):
        limiter.admit(member(monthlyTokens=9_000))
    limiter.admit(member(dailyTokens=1_501))
