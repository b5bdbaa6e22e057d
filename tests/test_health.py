import email.utils

import pytest

from ccx_proxy.health import Breaker, BreakerState, HealthRegistry, retry_after_seconds
from ccx_proxy.policy import BreakerPolicy

POLICY = BreakerPolicy(
    windowSize=10, minRequests=4, failureRateThreshold=0.5, consecutiveFailures=3, openMs=1000, maxOpenMs=4000
)


def test_consecutive_failures_open_the_circuit() -> None:
    b = Breaker(POLICY)
    for _ in range(2):
        assert b.acquire(0)
        b.failure(0)
    assert b.state is BreakerState.CLOSED
    b.failure(0)
    assert b.state is BreakerState.OPEN and not b.available(0.5) and b.available(1.0)


def test_failure_rate_over_the_window_opens_the_circuit() -> None:
    b = Breaker(POLICY)
    for ok in (True, False, True, False):
        b.success() if ok else b.failure(0)
    assert b.state is BreakerState.OPEN  # 2 of 4 failed, at the 50 % threshold


def test_half_open_lets_one_probe_and_backoff_doubles_to_the_cap() -> None:
    b = Breaker(POLICY)
    for _ in range(3):
        b.failure(0)
    assert b.open_until == 1.0
    now = 1.0
    for expected in (2.0, 4.0, 4.0):  # doubled, doubled, capped
        assert b.acquire(now) and b.state is BreakerState.HALF_OPEN
        assert not b.acquire(now)  # one probe at a time
        b.failure(now)
        assert b.state is BreakerState.OPEN and b.open_until == now + expected
        now = b.open_until
    assert b.acquire(now)
    b.success()
    assert b.state is BreakerState.CLOSED and b.acquire(now)
    for _ in range(3):
        b.failure(now)
    assert b.open_until == now + 1.0  # backoff reset by the success


def test_released_probe_frees_the_half_open_slot() -> None:
    b = Breaker(POLICY)
    for _ in range(3):
        b.failure(0)
    assert b.acquire(2)
    b.release()
    assert b.acquire(2)


def test_disabled_breaker_never_opens() -> None:
    b = Breaker(BreakerPolicy(enabled=False, consecutiveFailures=1))
    for _ in range(10):
        b.failure(0)
    assert b.acquire(0) and b.state is BreakerState.CLOSED


def test_registry_reload_reenables_keys_and_forgets_removed_channels() -> None:
    registry = HealthRegistry(clock=lambda: 0.0)
    a = registry.channel("a", POLICY)
    a.key("k", POLICY).disabled = True
    a.key("k", POLICY).cool_down("m", 50)
    registry.channel("gone", POLICY)
    registry.reloaded({"a"})
    assert registry.get("gone") is None
    assert not registry.channel("a", POLICY).key("k", POLICY).disabled
    assert registry.channel("a", POLICY).key("k", POLICY).cooling("m", 0) == 50
    assert registry.channel("a", POLICY).key("k", POLICY).cooling("other-model", 0) == 0


@pytest.mark.parametrize(
    "headers, expected",
    [
        pytest.param({"retry-after": "12"}, 12.0, id="seconds"),
        pytest.param({"retry-after": "1.5"}, 1.5, id="fraction"),
        pytest.param({"retry-after": email.utils.formatdate(1_000_030, usegmt=True)}, 30.0, id="http-date"),
        pytest.param(
            {
                "anthropic-ratelimit-requests-reset": "1970-01-12T13:47:10Z",
                "anthropic-ratelimit-tokens-reset": "1970-01-12T13:46:50Z",
            },
            30.0,
            id="reset-latest",
        ),
        pytest.param({"anthropic-ratelimit-tokens-reset": "1970-01-01T00:00:00Z"}, None, id="reset-past"),
        pytest.param({"retry-after": "soon"}, None, id="garbage"),
        pytest.param({}, None, id="none"),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers, now_wall=1_000_000) == expected
