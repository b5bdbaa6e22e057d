"""Live health of channels and keys: circuit breakers, cooldowns, disabled keys.

State is keyed by channel name and key, and outlives configuration reloads (a
reload re-enables keys disabled for auth failures).  All times are
``time.monotonic()`` seconds; a clock can be injected for tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from .policy import BreakerPolicy

if TYPE_CHECKING:
    from .shared.health import HealthSync

Clock = Callable[[], float]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    """Sliding-window circuit breaker with a growing half-open backoff."""

    __slots__ = (
        "policy",
        "_outcomes",
        "_failures",
        "consecutive",
        "state",
        "open_until",
        "_backoff",
        "_probing",
    )

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._outcomes: deque[bool] = deque(maxlen=max(1, policy.windowSize))
        self._failures = 0
        self.consecutive = 0
        self.state = BreakerState.CLOSED
        self.open_until = 0.0
        self._backoff = policy.openMs / 1000
        self._probing = False

    def available(self, now: float) -> bool:
        """Whether a request may go through now (without claiming the half-open probe)."""
        if not self.policy.enabled or self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now >= self.open_until
        return not self._probing

    def acquire(self, now: float) -> bool:
        """Claim a pass; in half-open state only one probe is let through at a time."""
        if not self.available(now):
            return False
        if self.policy.enabled and self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            self._probing = True
        return True

    def force(self, now: float) -> None:
        """Let a request through past an open breaker (panic routing): it becomes the probe."""
        if self.policy.enabled and self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            self._probing = True

    def reopens_at(self, now: float) -> float:
        """When a request could next pass (``now`` if it can now)."""
        if self.available(now):
            return now
        return max(now, self.open_until) if self.state is BreakerState.OPEN else now

    def release(self) -> None:
        """The pass ended without telling anything about the upstream (e.g. the client left)."""
        self._probing = False

    def success(self) -> None:
        self._record(True)
        self.consecutive = 0
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self._backoff = self.policy.openMs / 1000
            self._outcomes.clear()
            self._failures = 0
        self._probing = False

    def failure(self, now: float) -> None:
        self._record(False)
        self.consecutive += 1
        if not self.policy.enabled:
            return
        if self.state is BreakerState.HALF_OPEN:
            self._backoff = min(self._backoff * 2, self.policy.maxOpenMs / 1000)
            self._open(now)
        elif self.state is BreakerState.CLOSED and self._tripped():
            self._open(now)
        self._probing = False

    def opened_elsewhere(self, until: float) -> None:
        """Another instance saw this breaker trip (:mod:`ccx_proxy.shared.health`): open
        until ``until`` (its own back-off stays as it is)."""
        if self.policy.enabled and (self.state is not BreakerState.OPEN or until > self.open_until):
            self.state = BreakerState.OPEN
            self.open_until = max(self.open_until, until)

    def closed_elsewhere(self) -> None:
        """Another instance's probe got through: closed, with a fresh window."""
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self._backoff = self.policy.openMs / 1000
            self._outcomes.clear()
            self._failures = 0
            self.consecutive = 0
            self._probing = False

    def _tripped(self) -> bool:
        p = self.policy
        if self.consecutive >= p.consecutiveFailures > 0:
            return True
        n = len(self._outcomes)
        return n >= max(1, p.minRequests) and self._failures / n >= p.failureRateThreshold

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.open_until = now + self._backoff

    def _record(self, ok: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen and not self._outcomes[0]:
            self._failures -= 1
        self._outcomes.append(ok)
        if not ok:
            self._failures += 1

    @property
    def failure_rate(self) -> float:
        return self._failures / len(self._outcomes) if self._outcomes else 0.0


MAX_COOLDOWNS = 256  # (key, model) cool-downs kept per key; the oldest go first


class KeyHealth:
    __slots__ = ("breaker", "cooldowns", "disabled", "last_error")

    def __init__(self, policy: BreakerPolicy) -> None:
        self.breaker = Breaker(policy)
        self.cooldowns: dict[str, float] = {}  # upstream model -> end of its 429 cool-down
        self.disabled = False
        self.last_error = ""

    def cool_down(self, model: str, until: float) -> None:
        cooldowns = self.cooldowns
        cooldowns.pop(model, None)
        if len(cooldowns) >= MAX_COOLDOWNS:
            del cooldowns[next(iter(cooldowns))]
        cooldowns[model] = until

    def cooling(self, model: str, now: float) -> float:
        """Seconds left of ``model``'s cool-down on this key (0: none)."""
        until = self.cooldowns.get(model)
        if until is None:
            return 0.0
        if until <= now:
            del self.cooldowns[model]
            return 0.0
        return until - now

    def available(self, now: float, model: str) -> bool:
        return not self.disabled and self.breaker.available(now) and not self.cooling(model, now)

    def usable_at(self, now: float, model: str) -> float:
        """When this key could next serve ``model`` (soft exclusions only)."""
        return max(self.breaker.reopens_at(now), now + self.cooling(model, now))


class ChannelHealth:
    __slots__ = ("breaker", "backoff_until", "keys", "last_error", "requests", "successes", "ttfb")

    def __init__(self, policy: BreakerPolicy) -> None:
        self.breaker = Breaker(policy)
        self.backoff_until = 0.0
        self.keys: dict[str, KeyHealth] = {}
        self.last_error = ""
        self.requests = 0  # upstream attempts
        self.successes = 0  # attempts that got a status the client was given
        self.ttfb: deque[float] = deque(maxlen=256)  # seconds to response headers, recent

    def available(self, now: float) -> bool:
        return now >= self.backoff_until and self.breaker.available(now)

    def usable_at(self, now: float) -> float:
        """When the channel could next take a request (soft exclusions only)."""
        return max(now, self.backoff_until, self.breaker.reopens_at(now))

    def key(self, key: str, policy: BreakerPolicy) -> KeyHealth:
        health = self.keys.get(key)
        if health is None:
            health = self.keys[key] = KeyHealth(policy)
        return health


class HealthRegistry:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._channels: dict[str, ChannelHealth] = {}
        # REDIS_URL: what this process learns goes to every instance (ccx_proxy.shared.health).
        self.sync: HealthSync | None = None

    def channel(self, name: str, policy: BreakerPolicy) -> ChannelHealth:
        health = self._channels.get(name)
        if health is None or (health.breaker.policy is not policy and health.breaker.policy != policy):
            fresh = ChannelHealth(policy)
            if health is not None:  # policy changed on reload: keep cooldowns, new breakers
                fresh.backoff_until = health.backoff_until
                fresh.requests, fresh.successes, fresh.ttfb = health.requests, health.successes, health.ttfb
                fresh.keys = {k: _rebreak(v, policy) for k, v in health.keys.items()}
            health = self._channels[name] = fresh
        return health

    def get(self, name: str) -> ChannelHealth | None:
        return self._channels.get(name)

    def reloaded(self, names: set[str]) -> None:
        """A new configuration: forget removed channels, re-enable auth-disabled keys."""
        for name in list(self._channels):
            if name not in names:
                del self._channels[name]
        for health in self._channels.values():
            for key in health.keys.values():
                key.disabled = False


def _rebreak(key: KeyHealth, policy: BreakerPolicy) -> KeyHealth:
    fresh = KeyHealth(policy)
    fresh.cooldowns = key.cooldowns
    fresh.disabled = key.disabled
    return fresh


_RESET_HEADERS = (
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
)


def retry_after_seconds(headers: Mapping[str, str], now_wall: float | None = None) -> float | None:
    """How long a 429 asks to wait: ``Retry-After`` (seconds or HTTP date), else the
    latest ``anthropic-ratelimit-*-reset`` (RFC 3339); None when none is usable."""
    wall = time.time() if now_wall is None else now_wall
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - wall)
        except (TypeError, ValueError, IndexError):
            pass
    waits = []
    for name in _RESET_HEADERS:
        stamp = headers.get(name)
        if not stamp:
            continue
        try:
            when = datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        waits.append(when.timestamp() - wall)
    positive = [w for w in waits if w > 0]
    return max(positive) if positive else None
