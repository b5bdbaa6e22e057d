"""Per-member limits, checked in memory before a request goes upstream.

* ``rpm``: requests admitted in the last 60 s (a sliding window: the times of the last
  ``rpm`` admissions are kept, so memory per member is bounded by the limit).
* ``maxConcurrent``: requests in flight; released on every exit path (``release``).
* ``dailyTokens`` / ``monthlyTokens`` / ``dailyUsd`` / ``monthlyUsd``: what was already
  spent (UTC day and month) against the budget.  Checked before forwarding against what is
  spent so far and updated as usage arrives, so one long request may overshoot a budget:
  the next one is refused.  Totals are loaded from the database at startup.

A rate limit is a ``429 rate_limit_error`` with ``Retry-After``; a spent budget is a
``429`` with ``x-should-retry: false`` and ``Retry-After`` until the reset; a model or
channel the member may not use is a ``403 permission_error``.  With ``--workers N`` every
worker keeps its own counters (limits per worker; the startup log says so), unless
``REDIS_URL`` is set: then :mod:`ccx_proxy.shared.limits` counts in Redis, for every worker
and host, and this limiter is its fallback.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..errors import BudgetExhausted, RateLimited
from .members import Member

WINDOW = 60.0


@dataclass(slots=True)
class Spent:
    day: str = ""
    month: str = ""
    day_tokens: int = 0
    day_usd: float = 0.0
    month_tokens: int = 0
    month_usd: float = 0.0

    def roll(self, day: str) -> None:
        """Start a new day (and month) when the clock has passed into one."""
        if day != self.day:
            if day[:7] != self.month:
                self.month, self.month_tokens, self.month_usd = day[:7], 0, 0.0
            self.day, self.day_tokens, self.day_usd = day, 0, 0.0


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def _next_day(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def _next_month(now: float) -> float:
    first = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if first.month == 12:
        return first.replace(year=first.year + 1, month=1).timestamp()
    return first.replace(month=first.month + 1).timestamp()


class Limiter:
    __slots__ = ("clock", "_recent", "_active", "_spent", "_day", "_day_start", "_day_end", "_month_end")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._active: dict[str, int] = {}
        self._spent: dict[str, Spent] = {}
        # The current UTC day and when it (and its month) ends: computed once a day, not per
        # request (datetime arithmetic costs microseconds).
        self._day = ""
        self._day_start = self._day_end = self._month_end = 0.0

    def _today(self, now: float) -> str:
        if not self._day_start <= now < self._day_end:
            self._day = utc_day(now)
            self._day_end = _next_day(now)
            self._day_start = self._day_end - 86400
            self._month_end = _next_month(now)
        return self._day

    def period(self, now: float) -> tuple[str, float, float]:
        """The UTC day of ``now`` (``YYYY-MM-DD``), when it ends and when its month ends."""
        day = self._today(now)
        return day, self._day_end, self._month_end

    # -- what is spent -------------------------------------------------------------------

    def load(self, totals: Mapping[str, tuple[int, float, int, float]], now: float) -> None:
        """Today's and this month's totals per member: (day tokens, day USD, month tokens,
        month USD), as the database has them."""
        day = utc_day(now)
        for name, (day_tokens, day_usd, month_tokens, month_usd) in totals.items():
            self._spent[name] = Spent(day, day[:7], day_tokens, day_usd, month_tokens, month_usd)

    def spent(self, name: str, now: float | None = None) -> Spent:
        spent = self._spent.get(name)
        if spent is None:
            spent = self._spent[name] = Spent()
        spent.roll(self._today(self.clock() if now is None else now))
        return spent

    def spend(self, name: str, tokens: int, usd: float | None, now: float) -> None:
        spent = self.spent(name, now)
        spent.day_tokens += tokens
        spent.month_tokens += tokens
        if usd:
            spent.day_usd += usd
            spent.month_usd += usd

    def active(self, name: str) -> int:
        return self._active.get(name, 0)

    # -- admission -------------------------------------------------------------------------

    def admit(self, member: Member) -> None:
        """Count one request in, or raise the error that refuses it."""
        if not member.limited:
            return
        limits = member.limits
        now = self.clock()
        name = member.name
        if (
            limits.dailyTokens is not None
            or limits.monthlyTokens is not None
            or limits.dailyUsd is not None
            or limits.monthlyUsd is not None
        ):
            self._check_budgets(member, now)
        if limits.maxConcurrent is not None and self._active.get(name, 0) >= limits.maxConcurrent:
            raise RateLimited(
                f"concurrency limit of {name}: {limits.maxConcurrent} requests at once; "
                "retry when one of them has finished",
                retry_after=1,
            )
        if limits.rpm is not None:
            recent = self._recent.get(name)
            if recent is None or recent.maxlen != max(limits.rpm, 1):
                recent = self._recent[name] = deque(recent or (), maxlen=max(limits.rpm, 1))
            while recent and now - recent[0] >= WINDOW:
                recent.popleft()
            if len(recent) >= limits.rpm:
                wait = WINDOW - (now - recent[0]) if recent else WINDOW
                raise RateLimited(
                    f"rate limit of {name}: {limits.rpm} requests per minute; retry in {math.ceil(wait)} s",
                    retry_after=max(1.0, wait),
                )
            recent.append(now)
        if limits.maxConcurrent is not None:
            self._active[name] = self._active.get(name, 0) + 1

    def release(self, member: Member) -> None:
        """The request admitted by :meth:`admit` has ended (every exit path)."""
        if member.limits.maxConcurrent is None:
            return
        left = self._active.get(member.name, 0) - 1
        if left > 0:
            self._active[member.name] = left
        else:
            self._active.pop(member.name, None)

    def _check_budgets(self, member: Member, now: float) -> None:
        limits, spent = member.limits, self.spent(member.name, now)
        day_reset, month_reset = self._day_end, self._month_end
        checks = (
            (limits.dailyTokens, spent.day_tokens, "daily token budget", day_reset, "00:00 UTC"),
            (
                limits.monthlyTokens,
                spent.month_tokens,
                "monthly token budget",
                month_reset,
                "00:00 UTC on the 1st",
            ),
            (limits.dailyUsd, spent.day_usd, "daily USD budget", day_reset, "00:00 UTC"),
            (limits.monthlyUsd, spent.month_usd, "monthly USD budget", month_reset, "00:00 UTC on the 1st"),
        )
        for limit, used, what, reset_at, reset_text in checks:
            if limit is not None and used >= limit:
                amount = f"${limit:,.2f}" if "USD" in what else f"{limit:,}"
                raise BudgetExhausted(
                    f"{what} of {member.name} ({amount}) used up; resets at {reset_text} -- "
                    "ask the gateway's operator to raise it",
                    retry_after=max(1.0, reset_at - now),
                )
