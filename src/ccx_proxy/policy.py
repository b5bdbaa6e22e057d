"""Resilience settings: timeouts, failover bounds, cooldowns, circuit breaking,
session affinity.  Frozen dataclasses, parsed once at load from the top level of
``channels.json`` (and, for timeouts and the circuit breaker, per channel)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Milliseconds, as in the file; 0 turns ``keepaliveMs`` off."""

    connectTimeoutMs: int = 10_000
    # Until response headers: for streaming requests (headers come at once when the
    # upstream is alive), and for non-streaming ones, whose headers come only with the
    # whole answer (600 s is the anthropic SDKs' own default).
    responseHeaderTimeoutMs: int = 60_000
    nonStreamTimeoutMs: int = 600_000
    streamInactivityTimeoutMs: int = 120_000
    keepaliveMs: int = 15_000

    def first_byte(self, stream: bool) -> float:
        """Seconds to wait for response headers."""
        return (self.responseHeaderTimeoutMs if stream else self.nonStreamTimeoutMs) / 1000

    @property
    def connect(self) -> float:
        return self.connectTimeoutMs / 1000

    @property
    def inactivity(self) -> float:
        return self.streamInactivityTimeoutMs / 1000

    @property
    def keepalive(self) -> float:
        return self.keepaliveMs / 1000


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    enabled: bool = True
    windowSize: int = 20  # recent outcomes kept
    minRequests: int = 10  # outcomes needed before the failure rate counts
    failureRateThreshold: float = 0.5
    consecutiveFailures: int = 5
    openMs: int = 5_000  # first backoff before a half-open probe
    maxOpenMs: int = 300_000  # backoff doubles per failed probe up to this


@dataclass(frozen=True, slots=True)
class AffinityPolicy:
    enabled: bool = True
    ttlMs: int = 30 * 60 * 1000  # idle time after which a session is forgotten
    thinkingTtlMs: int = 24 * 60 * 60 * 1000  # the same for a session that carries thinking
    maxSessions: int = 100_000


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    maxAttempts: int = 0  # 0: every candidate (channel x URL x key) once
    failoverDeadlineMs: int = 180_000  # all attempts together, until response headers
    rateLimitCooldownMs: int = 5_000  # a 429 without Retry-After / reset headers
    rateLimitCooldownCapMs: int = 600_000
    overloadBackoffMs: int = 5_000  # a 529 backs the whole channel off this long
    allowChannelHeader: bool = True  # X-Channel: <name> pins a channel
    maxConcurrentStreams: int = 10_000  # requests relayed at once per process; 0: no limit


TIMEOUT_FIELDS = tuple(f.name for f in fields(Timeouts) if f.init)
BREAKER_FIELDS = tuple(f.name for f in fields(BreakerPolicy))
AFFINITY_FIELDS = tuple(f.name for f in fields(AffinityPolicy))
ROUTING_FIELDS = tuple(f.name for f in fields(RoutingPolicy))


def parse_section(cls: type[Any], raw: Any, where: str, problems: list[str], base: Any = None) -> Any:
    """Overlay ``raw`` (a dict of camelCase fields) on ``base`` (or the defaults).

    Unknown fields and wrong types become problems with their path.
    """
    result = base if base is not None else cls()
    if raw is None:
        return result
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object")
        return result

    def path(name: str) -> str:
        return f"{where}.{name}" if where else name

    changes: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls) if f.init}
    for name, value in raw.items():
        if name not in known:
            problems.append(f"{path(name)}: unknown field (known: {', '.join(known)})")
            continue
        default = getattr(cls(), name)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok:
            expected = {bool: "true or false", float: "a number in (0, 1]"}.get(
                type(default), "a non-negative integer"
            )
            problems.append(f"{path(name)}: must be {expected} (got {value!r})")
            continue
        changes[name] = value
    return replace(result, **changes) if changes else result
