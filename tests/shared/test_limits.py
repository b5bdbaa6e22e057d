"""Member limits in Redis: one count for several processes (here: several stores, one
Redis), slots that expire when their holder dies, budgets, and the fail policy."""

from __future__ import annotations

import asyncio
import time

import pytest

from ccx_proxy.errors import BudgetExhausted, RateLimited, SharedStateUnavailable
from ccx_proxy.settings import RedisSettings
from ccx_proxy.shared.client import STATS, SharedStore
from ccx_proxy.shared.limits import SharedLimiter
from ccx_proxy.team.limits import Limiter
from ccx_proxy.team.members import Limits, Member
from tests.redis_server import RedisServer


def member(**limits: float) -> Member:
    return Member(name="alice", key_prefix="ccx-abcd…", limits=Limits(**limits))  # type: ignore[arg-type]


async def limiter(
    server: RedisServer, prefix: str, *, failure: str = "open", slot_ttl: float = 30.0, totals: object = None
) -> SharedLimiter:
    store = SharedStore(RedisSettings(server.url, failure=failure, prefix=prefix, slot_ttl=slot_ttl))
    shared = SharedLimiter(store, Limiter(), totals)  # type: ignore[arg-type]
    await store.start()
    shared.start()
    return shared


async def close(*limiters: SharedLimiter) -> None:
    for shared in limiters:
        await shared.stop()
        await shared.store.stop()


async def test_rpm_holds_across_processes(redis_server: RedisServer, prefix: str) -> None:
    a, b, c = [await limiter(redis_server, prefix) for _ in range(3)]
    alice = member(rpm=30)
    admitted = refused = 0

    async def one(shared: SharedLimiter) -> None:
        nonlocal admitted, refused
        try:
            await shared.admit(alice)
            admitted += 1
        except RateLimited as exc:
            refused += 1
            assert "30 requests per minute across the gateway's instances" in exc.message
            assert 1 <= exc.retry_after <= 60  # type: ignore[operator]

    try:
        await asyncio.gather(*(one(s) for _ in range(20) for s in (a, b, c)))  # 60 at once
        assert (admitted, refused) == (30, 30)
    finally:
        await close(a, b, c)


async def test_concurrency_holds_across_processes_and_is_released(
    redis_server: RedisServer, prefix: str
) -> None:
    a, b = await limiter(redis_server, prefix), await limiter(redis_server, prefix)
    alice = member(maxConcurrent=2)
    try:
        slot_a = await a.admit(alice)
        slot_b = await b.admit(alice)
        assert slot_a and slot_b and slot_a != slot_b
        for shared in (a, b):
            with pytest.raises(RateLimited, match="2 requests at once across"):
                await shared.admit(alice)
        b.finish(alice, slot_b, 0, None, time.time())
        await asyncio.sleep(0)  # the release goes out with the next pipeline
        slot = await a.admit(alice)  # the slot b gave back
        assert slot
    finally:
        await close(a, b)


async def test_a_dead_holders_slot_expires(redis_server: RedisServer, prefix: str) -> None:
    alive = await limiter(redis_server, prefix, slot_ttl=1)
    dying = await limiter(redis_server, prefix, slot_ttl=1)
    alice = member(maxConcurrent=1)
    try:
        assert await alive.admit(alice)  # held for longer than the TTL: refreshed, kept
        await dying.stop()  # the "process" stops refreshing and never releases
        await asyncio.sleep(1.5)
        with pytest.raises(RateLimited):
            await dying.admit(alice)  # alive's slot is still there (refreshed)
        alive_slots = set(alive._held["alice"])
        await alive.stop()  # now alive dies too, holding its slot
        started = time.monotonic()
        while True:
            try:
                await dying.admit(alice)
                break
            except RateLimited:
                assert time.monotonic() - started < 3, f"slot {alive_slots} never expired"
                await asyncio.sleep(0.1)
        assert time.monotonic() - started <= 1.5
    finally:
        await alive.store.stop()
        await dying.store.stop()


async def test_budgets_are_shared_and_seeded(redis_server: RedisServer, prefix: str) -> None:
    async def totals() -> dict[str, tuple[int, float, int, float]]:
        return {"alice": (900, 0.5, 5000, 2.0)}

    a = await limiter(redis_server, prefix, totals=totals)
    b = await limiter(redis_server, prefix)
    alice = member(dailyTokens=1000, monthlyUsd=3.0)
    try:
        await b.admit(alice)  # 900 of 1000 spent (seeded by a): still in
        a.finish(alice, "", 100, 0.25, time.time())  # spent on a
        await asyncio.sleep(0.05)
        with pytest.raises(BudgetExhausted) as caught:
            await b.admit(alice)  # b sees a's spend
        assert "daily token budget of alice (1,000) used up" in caught.value.message
        assert not caught.value.retryable and caught.value.retry_after is not None

        bob = Member(name="bob", key_prefix="ccx-…", limits=Limits(monthlyUsd=1.0))
        await a.admit(bob)
        b.finish(bob, "", 10, 1.5, time.time())
        await asyncio.sleep(0.05)
        with pytest.raises(BudgetExhausted, match=r"monthly USD budget of bob \(\$1.00\)"):
            await a.admit(bob)
    finally:
        await close(a, b)


async def test_redis_down_falls_back_to_local_limits_and_back(own_redis: RedisServer, prefix: str) -> None:
    a = await limiter(own_redis, prefix)
    alice = member(rpm=2)
    try:
        await a.admit(alice)
        own_redis.stop()
        fallbacks = STATS["fallbacks"]
        assert await a.admit(alice) is None  # Redis down: the local limiter took it
        assert await a.admit(alice) is None
        with pytest.raises(RateLimited, match="2 requests per minute; retry"):
            await a.admit(alice)  # local rpm: 2 in this process
        assert STATS["fallbacks"] == fallbacks + 3
        own_redis.start()  # an empty Redis: shared counting starts again
        deadline = time.monotonic() + 10
        while not a.store.up:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await a.admit(alice) == ""  # counted in Redis again (no slot: no concurrency limit)
    finally:
        await close(a)


async def test_redis_down_closed_refuses_limited_members(own_redis: RedisServer, prefix: str) -> None:
    a = await limiter(own_redis, prefix, failure="closed")
    try:
        own_redis.stop()
        with pytest.raises(SharedStateUnavailable) as caught:
            await a.admit(member(rpm=5))
        assert caught.value.status == 503 and caught.value.retry_after == 1
        assert "REDIS_FAILURE=closed" in caught.value.message
    finally:
        await close(a)


async def test_a_client_leaving_during_admission_gives_its_slot_back(
    redis_server: RedisServer, prefix: str
) -> None:
    a = await limiter(redis_server, prefix)  # slots expire after 30 s: only a release frees one
    alice = member(maxConcurrent=1)
    try:
        cancelled = 0
        for _ in range(5):
            admission = asyncio.create_task(a.admit(alice))
            await asyncio.sleep(0)  # queued for the next pipeline, which goes out anyway
            admission.cancel()
            try:
                slot = await admission
            except asyncio.CancelledError:
                cancelled += 1
            except RateLimited:
                pass  # an earlier cancelled admission's slot, not given back yet
            else:  # the answer came before the cancellation: a slot legitimately held
                a.finish(alice, slot, 0, None, time.time())
        assert cancelled
        deadline = time.monotonic() + 2
        while True:
            try:
                slot = await a.admit(alice)
                break
            except RateLimited:
                assert time.monotonic() < deadline, "a cancelled admission kept its slot"
                await asyncio.sleep(0.02)
        assert slot
    finally:
        await close(a)


async def test_seeding_raises_counters_to_what_the_database_knows(
    redis_server: RedisServer, prefix: str
) -> None:
    async def totals() -> dict[str, tuple[int, float, int, float]]:
        return {"alice": (900, 0.5, 5000, 2.0)}

    a = await limiter(redis_server, prefix, totals=totals)
    try:
        day_key, month_key = a._keys("alice", a.local.period(time.time())[0])[2:]
        await a.store.call("HSET", day_key, "t", 50)  # spent since a Redis restart, before the seed
        await a.store.call("HSET", month_key, "t", 9000)  # more than the database knows: kept
        await a.seed()
        await asyncio.sleep(0)
        assert await a.store.call("HGET", day_key, "t") == b"900"
        assert await a.store.call("HGET", month_key, "t") == b"9000"
        assert float(await a.store.call("HGET", day_key, "u")) == 0.5
    finally:
        await close(a)
