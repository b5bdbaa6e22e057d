"""Member limits held in Redis: one count for every worker and host.

Per member (keys share the hash tag ``{name}``, so they live on one Redis Cluster slot):

* ``lim:{name}:rpm``: a sorted set of the admissions of the last 60 s (score: Redis's own
  clock, so hosts with skewed clocks agree); at most ``rpm`` entries.
* ``lim:{name}:slots``: the concurrency slots held now, each scored with when it expires.
  A process refreshes its slots every third of ``REDIS_SLOT_TTL_S`` (default 30 s) and
  removes them when the request ends, on every exit path; the slots of a process that died
  (``SIGKILL``, a lost host) expire by themselves.
* ``spend:{name}:d:<day>`` / ``spend:{name}:m:<month>``: tokens (``t``) and USD (``u``)
  spent, UTC, expiring after the period.  Seeded from the database when Redis comes up (each
  counter raised to at least the database's total), so a Redis restart does not forget what
  was spent.

One admission is one ``EVALSHA`` (budgets, concurrency and rpm checked and counted
atomically); the end of a request is fire-and-forget (slot removed, spend added), batched
with everything else of that loop turn into one pipeline.

Redis down or slower than ``REDIS_TIMEOUT_MS``: with ``REDIS_FAILURE=open`` (default) the
process's own :class:`~ccx_proxy.team.limits.Limiter` decides (limits per process, counted in
``ccx_redis_fallbacks_total``); with ``closed`` a member with limits is refused with 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..errors import BudgetExhausted, RateLimited, SharedStateUnavailable
from ..tasks import cancel_and_wait
from ..team.limits import WINDOW, Limiter, utc_day
from ..team.members import SHARED_MEMBER, Member
from .client import STATS, SharedDown, SharedStore

log = logging.getLogger("ccx_proxy.shared")

DAY_TTL = 3 * 86400  # a day's spend outlives the day a little (reports, clock skew)
MONTH_TTL = 33 * 86400

# KEYS: rpm, slots, day spend, month spend.  ARGV: rpm (-1: none), window ms, max concurrent
# (-1: none), slot id, slot ttl ms, then the budgets: day tokens, month tokens, day USD,
# month USD (-1: none).  Returns {verdict, number}: ok / budget (which one) / concurrency /
# rpm (ms until a request leaves the window).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local checks = {{KEYS[3], 't', ARGV[6]}, {KEYS[4], 't', ARGV[7]},
                {KEYS[3], 'u', ARGV[8]}, {KEYS[4], 'u', ARGV[9]}}
for i, c in ipairs(checks) do
  local limit = tonumber(c[3])
  if limit >= 0 then
    local used = tonumber(redis.call('HGET', c[1], c[2]) or '0')
    if used >= limit then return {'budget', i} end
  end
end
local conc = tonumber(ARGV[3])
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {'concurrency', 0} end
end
local rpm = tonumber(ARGV[1])
if rpm >= 0 then
  local window = tonumber(ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    local wait = window
    if oldest[2] then wait = tonumber(oldest[2]) + window - now end
    return {'rpm', wait}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
end
if conc >= 0 then
  local ttl = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
return {'ok', 0}
"""

# KEYS: slots.  ARGV: slot ttl ms, then the slot ids this process still holds (added again
# if they expired while Redis was away: they are still in use).
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 0
"""

# The end of a request.  KEYS: slots, day spend, month spend.  ARGV: slot id ("" if none),
# tokens, USD ("0" if none), day TTL s, month TTL s.
FINISH = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local tokens = tonumber(ARGV[2])
if tokens > 0 or ARGV[3] ~= '0' then
  for i = 2, 3 do
    if tokens > 0 then redis.call('HINCRBY', KEYS[i], 't', tokens) end
    if ARGV[3] ~= '0' then redis.call('HINCRBYFLOAT', KEYS[i], 'u', ARGV[3]) end
    redis.call('EXPIRE', KEYS[i], ARGV[2 + i])
  end
end
return 0
"""

# KEYS: day spend, month spend.  ARGV: the database's day tokens, day USD, month tokens, month
# USD, day TTL s, month TTL s.  Each counter becomes at least what the database knows (a Redis
# that restarted empty, or spend that could not be sent while it was away).
SEED = """
local values = {{KEYS[1], 't', ARGV[1]}, {KEYS[1], 'u', ARGV[2]},
                {KEYS[2], 't', ARGV[3]}, {KEYS[2], 'u', ARGV[4]}}
for _, v in ipairs(values) do
  if tonumber(redis.call('HGET', v[1], v[2]) or '0') < tonumber(v[3]) then
    redis.call('HSET', v[1], v[2], v[3])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 0
"""
MAX_ORPHANS = 10_000  # slots to give back once Redis answers; beyond that they expire

_BUDGETS = (
    ("daily token budget", "00:00 UTC"),
    ("monthly token budget", "00:00 UTC on the 1st"),
    ("daily USD budget", "00:00 UTC"),
    ("monthly USD budget", "00:00 UTC on the 1st"),
)

Totals = Mapping[str, tuple[int, float, int, float]]


def _limit(value: float | int | None) -> float | int:
    return -1 if value is None else value


class SharedLimiter:
    """The fleet-wide counterpart of :class:`~ccx_proxy.team.limits.Limiter` (which it falls
    back to, and keeps up to date, so a fallback starts from sensible numbers)."""

    def __init__(
        self,
        store: SharedStore,
        local: Limiter,
        totals: Callable[[], Awaitable[Totals]] | None = None,
    ) -> None:
        self.store = store
        self.local = local
        self.totals = totals  # the database's day and month totals per member (seeding)
        self.closed = store.settings.failure == "closed"
        self._ttl_ms = int(store.settings.slot_ttl * 1000)
        self._admit = store.script(ADMIT)
        self._refresh = store.script(REFRESH)
        self._finish = store.script(FINISH)
        self._seed = store.script(SEED)
        # Slots Redis may hold for requests that no longer need them: an admission whose answer
        # never came (the client left, a timeout) or a release that could not be sent.
        self._orphans: dict[str, str] = {}  # slot id -> its sorted set
        self._orphans_due = False
        self._ids = itertools.count()
        self._held: dict[str, set[str]] = {}  # member -> slot ids held by this process
        self._task: asyncio.Task[None] | None = None
        store.on_up.append(self.seed)
        store.on_up.append(self._release_orphans)

    def _keys(self, name: str, day: str) -> list[str]:
        key = self.store.key
        tag = "{" + name + "}"
        return [
            key("lim", tag, "rpm"),
            key("lim", tag, "slots"),
            key("spend", tag, "d", day),
            key("spend", tag, "m", day[:7]),
        ]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_slots())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _keep_slots(self) -> None:
        """Refresh the slots this process holds, so only a dead process's slots expire."""
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            if not self.store.up:
                continue
            day = utc_day(self.local.clock())
            for name, slots in list(self._held.items()):
                if slots:
                    self.store.send_eval(self._refresh, [self._keys(name, day)[1]], [self._ttl_ms, *slots])

    async def seed(self) -> None:
        """Spend the database knows about, for counters Redis lacks (after a Redis restart)."""
        if self.totals is None:
            return
        totals = await self.totals()
        day = utc_day(self.local.clock())
        for name, (day_tokens, day_usd, month_tokens, month_usd) in totals.items():
            _, _, day_key, month_key = self._keys(name, day)
            self.store.send_eval(
                self._seed,
                [day_key, month_key],
                [day_tokens, repr(day_usd), month_tokens, repr(month_usd), DAY_TTL, MONTH_TTL],
            )

    def _orphan(self, slot: str, slots_key: str) -> None:
        """Give ``slot`` back once the admission that may have taken it is surely over: after
        its pipeline's deadline (a release sent earlier could overtake it on another
        connection), or when Redis answers again."""
        if len(self._orphans) < MAX_ORPHANS:
            self._orphans[slot] = slots_key
        if not self._orphans_due:
            self._orphans_due = True
            asyncio.get_running_loop().call_later(2 * self.store.timeout + 0.01, self._send_orphans)

    def _send_orphans(self) -> None:
        self._orphans_due = False
        if self.store.up:  # else: on_up sends them
            orphans, self._orphans = self._orphans, {}
            for slot, slots_key in orphans.items():
                self.store.send("ZREM", slots_key, slot)

    async def _release_orphans(self) -> None:
        self._send_orphans()

    # -- per request ----------------------------------------------------------------------------

    async def admit(self, member: Member) -> str | None:
        """Count the request in (or raise): the concurrency slot it holds, ``""`` when it holds
        none in Redis, None when the local limiter took it (Redis down)."""
        limits = member.limits
        now = self.local.clock()
        day = self.local.period(now)[0]
        slot = f"{self.store.instance}:{next(self._ids)}"
        keys = self._keys(member.name, day)
        try:
            verdict, number = await self.store.eval(
                self._admit,
                keys,
                [
                    _limit(limits.rpm),
                    int(WINDOW * 1000),
                    _limit(limits.maxConcurrent),
                    slot,
                    self._ttl_ms,
                    _limit(limits.dailyTokens),
                    _limit(limits.monthlyTokens),
                    _limit(limits.dailyUsd),
                    _limit(limits.monthlyUsd),
                ],
            )
        except asyncio.CancelledError:  # the client left: the script may have run all the same
            if limits.maxConcurrent is not None:
                self._orphan(slot, keys[1])
            raise
        except SharedDown:
            if limits.maxConcurrent is not None:  # a timeout: the script may have run all the same
                self._orphan(slot, keys[1])
            STATS["fallbacks"] += 1
            if self.closed:
                raise SharedStateUnavailable(
                    "the gateway's shared limits store (Redis) is unreachable and REDIS_FAILURE=closed; "
                    "retry shortly",
                    retry_after=1,
                ) from None
            self.local.admit(member)
            return None
        if verdict == b"ok":
            if limits.maxConcurrent is None:
                return ""
            self._held.setdefault(member.name, set()).add(slot)
            return slot
        self._refuse(member, verdict, number, now)
        raise AssertionError("unreachable")  # pragma: no cover

    def _refuse(self, member: Member, verdict: bytes, number: Any, now: float) -> None:
        limits, name = member.limits, member.name
        if verdict == b"concurrency":
            raise RateLimited(
                f"concurrency limit of {name}: {limits.maxConcurrent} requests at once across the gateway's "
                "instances; retry when one of them has finished",
                retry_after=1,
            )
        if verdict == b"rpm":
            wait = max(1.0, int(number) / 1000)
            raise RateLimited(
                f"rate limit of {name}: {limits.rpm} requests per minute across the gateway's instances; "
                f"retry in {math.ceil(wait)} s",
                retry_after=wait,
            )
        index = int(number) - 1
        what, reset_text = _BUDGETS[index]
        limit = (limits.dailyTokens, limits.monthlyTokens, limits.dailyUsd, limits.monthlyUsd)[index]
        _, day_end, month_end = self.local.period(now)
        reset_at = day_end if index in (0, 2) else month_end
        amount = f"${limit:,.2f}" if "USD" in what else f"{limit:,}"
        raise BudgetExhausted(
            f"{what} of {name} ({amount}) used up; resets at {reset_text} -- "
            "ask the gateway's operator to raise it",
            retry_after=max(1.0, reset_at - now),
        )

    def finish(self, member: Member, slot: str | None, tokens: int, usd: float | None, now: float) -> None:
        """The request admitted by :meth:`admit` ended (every exit path): its slot back, its
        spend added -- one fire-and-forget command, in the next pipeline."""
        if slot is None:  # admitted by the local limiter (Redis was down)
            self.local.release(member)
        elif slot:
            held = self._held.get(member.name)
            if held is not None:
                held.discard(slot)
                if not held:
                    del self._held[member.name]
        if tokens or usd:
            self.local.spend(member.name, tokens, usd, now)
        elif not slot:
            return
        if member is SHARED_MEMBER:
            return  # the shared key has no budget
        slots, day_key, month_key = self._keys(member.name, self.local.period(now)[0])[1:]
        if slot and not self.store.up:
            self._orphan(slot, slots)  # the spend is re-seeded from the database on the way back
            return
        self.store.send_eval(
            self._finish,
            [slots, day_key, month_key],
            [slot or "", tokens, repr(usd) if usd else "0", DAY_TTL, MONTH_TTL],
        )
