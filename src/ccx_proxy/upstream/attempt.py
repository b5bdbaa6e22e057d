"""One attempt at one (channel, URL, key), and what failover does next.

An :class:`Attempt` owns the request's health bookkeeping: it claims the channel's
and the key's breaker passes (:meth:`acquire`) and settles them exactly once --
:meth:`succeeded` (with the time to first byte), one of the failure verdicts, or
:meth:`release` when the attempt ended without telling anything about the upstream
(the client left).  After headers went out, :meth:`broke_off` records a stream
that failed midway.

Every verdict also adds one to :data:`COUNTS` (attempts by channel and outcome), which
:mod:`ccx_proxy.ops.metrics` reads when it is scraped: a list index, no metrics call here.
"""

from __future__ import annotations

from enum import Enum

from ..config import Channel
from ..health import BreakerState, ChannelHealth, HealthRegistry, KeyHealth

OUTCOMES = ("success", "failed", "overloaded", "rate_limited", "rejected")
SUCCESS, FAILED, OVERLOADED, RATE_LIMITED, REJECTED = range(len(OUTCOMES))
# channel name -> attempts per outcome (indexed as OUTCOMES).  Names come from the channels
# file, so the table stays as small as the set of channel names this process has seen.
COUNTS: dict[str, list[int]] = {}


def _counts(channel: str) -> list[int]:
    counts = COUNTS.get(channel)
    if counts is None:
        counts = COUNTS[channel] = [0] * len(OUTCOMES)
    return counts


class Next(Enum):
    """Where failover goes after a failed attempt."""

    KEY = "next key"  # this key is out (rate limited, rejected): the next key, same URL
    URL = "next URL"  # the server failed: other keys would not help
    CHANNEL = "next channel"  # the channel is overloaded (529)


class Attempt:
    __slots__ = ("channel", "health", "key", "api_key", "model", "claim", "_registry", "_open")

    def __init__(
        self,
        registry: HealthRegistry,
        channel: Channel,
        health: ChannelHealth,
        key: KeyHealth,
        api_key: str,
        model: str,
    ) -> None:
        self.channel = channel
        self.health = health
        self.key = key
        self.api_key = api_key
        self.model = model  # the upstream model name: 429 cool-downs are per (key, model)
        self._registry = registry
        self._open = False
        # A half-open probe's claim across the fleet (ccx_proxy.shared.health): given back
        # however the attempt ends.
        self.claim: tuple[str, str] | None = None

    def acquire(self, now: float, *, panic: bool = False) -> bool:
        """Claim the breakers' passes; ``panic`` sends the request even past soft
        exclusions (cool-down, back-off, an open breaker): it then acts as the probe."""
        health = self.health
        if panic:
            health.breaker.force(now)
            self.key.breaker.force(now)
        else:
            if not health.breaker.acquire(now):
                return False
            self.key.breaker.acquire(now)
        health.requests += 1
        self._open = True
        return True

    def succeeded(self, ttfb: float) -> None:
        """Response headers arrived with a status the client gets: the upstream is alive."""
        _counts(self.channel.name)[SUCCESS] += 1
        health = self.health
        sync = self._registry.sync
        if sync is not None and (
            health.breaker.state is not BreakerState.CLOSED or health.backoff_until
        ):  # a probe got through: every instance closes the channel's breaker
            sync.closed(self.channel.name, None)
        if sync is not None and self.key.breaker.state is not BreakerState.CLOSED:
            sync.closed(self.channel.name, self.api_key)
        if self.claim is not None:
            self._unclaim()
        health.breaker.success()
        self.key.breaker.success()
        health.successes += 1
        health.ttfb.append(ttfb)
        # Served: whatever held this channel or key back for this model is over.
        if health.backoff_until:
            health.backoff_until = 0.0
        if self.key.cooldowns:
            self.key.cooldowns.pop(self.model, None)
        self._open = False

    def failed(self, message: str) -> None:
        """The upstream failed (connection, timeout, invalid response, 5xx)."""
        _counts(self.channel.name)[FAILED] += 1
        self._failed(message)

    def _unclaim(self) -> None:
        claim, self.claim = self.claim, None
        if claim is not None and self._registry.sync is not None:
            self._registry.sync.release_probe(*claim)

    def _failed(self, message: str) -> None:
        if self.claim is not None:
            self._unclaim()
        now = self._registry.clock()
        channel, key = self.health.breaker, self.key.breaker
        was = channel.state, key.state, channel.open_until, key.open_until
        channel.failure(now)
        key.failure(now)
        self.health.last_error = message
        self._open = False
        sync = self._registry.sync
        if sync is not None:  # a breaker (re)opened here: it opens on every instance
            if channel.state is BreakerState.OPEN and (was[0], was[2]) != (channel.state, channel.open_until):
                sync.opened(self.channel.name, None, channel.open_until)
            if key.state is BreakerState.OPEN and (was[1], was[3]) != (key.state, key.open_until):
                sync.opened(self.channel.name, self.api_key, key.open_until)

    def overloaded(self, seconds: float, message: str) -> None:
        """529: the channel backs off for ``seconds``."""
        _counts(self.channel.name)[OVERLOADED] += 1
        self._failed(message)
        self.health.backoff_until = self._registry.clock() + seconds
        if self._registry.sync is not None:
            self._registry.sync.overloaded(self.channel.name, self.health.backoff_until)

    def rate_limited(self, seconds: float, message: str) -> None:
        """429: this key cools down for this model only (Anthropic limits per model)."""
        _counts(self.channel.name)[RATE_LIMITED] += 1
        self.key.cool_down(self.model, self._registry.clock() + seconds)
        if self._registry.sync is not None:
            self._registry.sync.cooled(
                self.channel.name, self.api_key, self.model, self._registry.clock() + seconds
            )
        self.key.last_error = message
        self.health.last_error = message
        self.release()

    def rejected(self, message: str) -> None:
        """401/402/403: the key is out of rotation until the next reload."""
        _counts(self.channel.name)[REJECTED] += 1
        self.key.disabled = True
        self.key.last_error = message
        if self._registry.sync is not None:
            self._registry.sync.rejected(self.channel.name, self.api_key)
        self.health.last_error = message
        self.release()

    def release(self) -> None:
        """The attempt ended without a verdict on the upstream (e.g. the client left)."""
        if self.claim is not None:
            self._unclaim()
        if self._open:
            self._open = False
            self.health.breaker.release()
            self.key.breaker.release()

    def broke_off(self) -> None:
        """After headers: the stream stalled or was cut."""
        breaker = self.health.breaker
        was = breaker.state, breaker.open_until
        breaker.failure(self._registry.clock())
        sync = self._registry.sync
        if (
            sync is not None
            and breaker.state is BreakerState.OPEN
            and was != (breaker.state, breaker.open_until)
        ):
            sync.opened(self.channel.name, None, breaker.open_until)

    @property
    def probing(self) -> bool:
        """Whether this attempt is a half-open probe (of the channel's or the key's breaker)."""
        return (
            self.health.breaker.state is BreakerState.HALF_OPEN
            or self.key.breaker.state is BreakerState.HALF_OPEN
        )
