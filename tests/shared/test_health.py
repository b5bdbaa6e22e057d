"""Upstream health and affinity across instances: two gateways, one Redis.

What one instance learns from an upstream (a 429, a refused key, a breaker that opened or
closed) the other applies without paying for it again; a session pinned on one is pinned
on the other; a half-open probe goes out from one instance only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient

from ccx_proxy.health import BreakerState
from ccx_proxy.settings import RedisSettings
from ccx_proxy.state import GATEWAY
from tests.conftest import (
    AUTH,
    UPSTREAM_KEY,
    FakeUpstream,
    GatewayFactory,
    Recorded,
    Reply,
    channel,
    make_settings,
    message_body,
)
from tests.redis_server import RedisServer

ERROR_429 = Reply(
    status=429, headers={"Content-Type": "application/json", "retry-after": "30"}, chunks=[b"{}"]
)


async def until(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def pair(
    start_gateway: GatewayFactory, server: RedisServer, prefix: str, *channels: dict[str, Any], **top: Any
) -> tuple[TestClient[Any, Any], TestClient[Any, Any]]:
    settings = make_settings(redis=RedisSettings(server.url, prefix=prefix))
    a = await start_gateway(*channels, settings=settings, **top)
    b = await start_gateway(*channels, settings=settings, **top)
    for client in (a, b):  # subscribed: messages from now on reach it
        store = client.app[GATEWAY].shared
        assert store is not None and store.up
        await asyncio.wait_for(store.subscribed.wait(), 5)
    return a, b


def two_channels(
    up: FakeUpstream, alt: FakeUpstream, **up_fields: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        channel("up", up.url, priority=1, **up_fields),
        channel("alt", alt.url, priority=2, apiKeys=["sk-alt-key-000000000000"]),
    )


async def test_a_429_on_one_instance_cools_the_key_on_the_other(
    start_gateway: GatewayFactory, make_upstream: Any, redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await make_upstream(), await make_upstream()
    up.reply = ERROR_429
    a, b = await pair(start_gateway, redis_server, prefix, *two_channels(up, alt))
    response = await a.post("/v1/messages", data=message_body(), headers=AUTH)
    assert response.status == 200 and response.headers["x-ccx-channel"] == "alt"
    health_b = b.app[GATEWAY].health

    def cooled() -> bool:
        ch = health_b.get("up")
        return (
            ch is not None and ch.keys.get(UPSTREAM_KEY) is not None and bool(ch.keys[UPSTREAM_KEY].cooldowns)
        )

    await until(cooled)
    key = health_b.get("up").keys[UPSTREAM_KEY]  # type: ignore[union-attr]
    assert 25 < key.cooling("claude-sonnet-4-5", health_b.clock()) <= 30
    response = await b.post("/v1/messages", data=message_body(), headers=AUTH)
    assert response.status == 200 and response.headers["x-ccx-channel"] == "alt"
    assert len(up.requests) == 1  # b never sent its request to the cooled key
    assert len(alt.requests) == 2


async def test_a_rejected_key_and_an_open_breaker_reach_the_other_and_a_later_one(
    start_gateway: GatewayFactory, make_upstream: Any, redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await make_upstream(), await make_upstream()
    up.reply = Reply(status=401, headers={"Content-Type": "application/json"}, chunks=[b"{}"])
    a, b = await pair(start_gateway, redis_server, prefix, *two_channels(up, alt))
    assert (await a.post("/v1/messages", data=message_body(), headers=AUTH)).status == 200
    await until(
        lambda: (
            b.app[GATEWAY].health.get("up") is not None
            and b.app[GATEWAY].health.get("up").keys[UPSTREAM_KEY].disabled
        )
    )  # type: ignore[union-attr]
    # A third instance that starts now reads it from the health hash.
    settings = make_settings(redis=RedisSettings(redis_server.url, prefix=prefix))
    c = await start_gateway(*two_channels(up, alt), settings=settings)
    health_c = c.app[GATEWAY].health
    await until(lambda: health_c.get("up") is not None and health_c.get("up").keys[UPSTREAM_KEY].disabled)  # type: ignore[union-attr]
    assert (await c.post("/v1/messages", data=message_body(), headers=AUTH)).headers["x-ccx-channel"] == "alt"
    assert len(up.requests) == 1

    # A breaker that opens on one instance opens everywhere.
    up2, alt2 = await make_upstream(), await make_upstream()
    up2.reply = Reply(status=500, headers={"Content-Type": "application/json"}, chunks=[b"{}"])
    breaker = {"consecutiveFailures": 1, "openMs": 60_000}
    prefix2 = prefix + "b:"
    a, b = await pair(start_gateway, redis_server, prefix2, *two_channels(up2, alt2, circuitBreaker=breaker))
    assert (await a.post("/v1/messages", data=message_body(), headers=AUTH)).headers["x-ccx-channel"] == "alt"
    health_b = b.app[GATEWAY].health
    await until(
        lambda: health_b.get("up") is not None and health_b.get("up").breaker.state is BreakerState.OPEN
    )  # type: ignore[union-attr]
    assert (await b.post("/v1/messages", data=message_body(), headers=AUTH)).headers["x-ccx-channel"] == "alt"
    assert len(up2.requests) == 1


async def test_one_half_open_probe_across_instances_and_its_success_closes_everywhere(
    start_gateway: GatewayFactory, make_upstream: Any, redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await make_upstream(), await make_upstream()
    failing = True

    def reply(_: Recorded) -> Reply:
        if failing:
            return Reply(status=500, headers={"Content-Type": "application/json"}, chunks=[b"{}"])
        return Reply(before=1.0)  # the probe is out (no answer yet) for a second

    up.reply = reply
    breaker = {"consecutiveFailures": 1, "openMs": 300}
    a, b = await pair(start_gateway, redis_server, prefix, *two_channels(up, alt, circuitBreaker=breaker))
    assert (await a.post("/v1/messages", data=message_body(), headers=AUTH)).headers["x-ccx-channel"] == "alt"
    health_a, health_b = a.app[GATEWAY].health, b.app[GATEWAY].health
    await until(
        lambda: health_b.get("up") is not None and health_b.get("up").breaker.state is BreakerState.OPEN
    )  # type: ignore[union-attr]
    failing = False
    await asyncio.sleep(0.4)  # both breakers may now let a half-open probe through
    probe = asyncio.create_task(a.post("/v1/messages", data=message_body(), headers=AUTH))
    await until(lambda: len(up.requests) == 2)  # a's probe is out, its answer a second away
    # b must not send a second probe while a's is out: it goes to alt.
    response = await b.post("/v1/messages", data=message_body(), headers=AUTH)
    assert response.headers["x-ccx-channel"] == "alt"
    assert len(up.requests) == 2
    first = await probe
    assert first.status == 200 and first.headers["x-ccx-channel"] == "up"
    await first.read()
    await until(lambda: health_b.get("up").breaker.state is BreakerState.CLOSED)  # type: ignore[union-attr]
    assert health_a.get("up").breaker.state is BreakerState.CLOSED  # type: ignore[union-attr]
    response = await b.post("/v1/messages", data=message_body(), headers=AUTH)
    assert response.headers["x-ccx-channel"] == "up"


async def test_a_session_pinned_on_one_instance_is_pinned_on_the_other(
    start_gateway: GatewayFactory, make_upstream: Any, redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await make_upstream(), await make_upstream()
    calls = 0

    def reply(_: Recorded) -> Reply:
        nonlocal calls
        calls += 1
        if calls == 1:  # the session's first request fails over to alt
            return Reply(status=500, headers={"Content-Type": "application/json"}, chunks=[b"{}"])
        return Reply()

    up.reply = reply
    a, b = await pair(
        start_gateway, redis_server, prefix, *two_channels(up, alt, circuitBreaker={"enabled": False})
    )
    session = {**AUTH, "x-claude-code-session-id": "sess-1"}
    assert (await a.post("/v1/messages", data=message_body(), headers=session)).headers[
        "x-ccx-channel"
    ] == "alt"
    await asyncio.sleep(0.05)  # the pin goes out with the next pipeline
    response = await b.post("/v1/messages", data=message_body(), headers=session)
    assert response.headers["x-ccx-channel"] == "alt"  # up is healthy and first, but the session is on alt
    other = await b.post(
        "/v1/messages", data=message_body(), headers={**AUTH, "x-claude-code-session-id": "s2"}
    )
    assert other.headers["x-ccx-channel"] == "up"


async def test_redis_down_keeps_requests_flowing(
    start_gateway: GatewayFactory, make_upstream: Any, own_redis: RedisServer, prefix: str
) -> None:
    up, alt = await make_upstream(), await make_upstream()
    a, _ = await pair(start_gateway, own_redis, prefix, *two_channels(up, alt))
    own_redis.stop()
    session = {**AUTH, "x-claude-code-session-id": "sess-down"}
    for _ in range(5):
        response = await a.post("/v1/messages", data=message_body(), headers=session)
        assert response.status == 200
        await response.read()
    assert a.app[GATEWAY].shared.up is False  # type: ignore[union-attr]


async def test_a_failed_probe_gives_its_claim_back(
    start_gateway: GatewayFactory, make_upstream: Any, redis_server: RedisServer, prefix: str
) -> None:
    import redis as redis_sync

    up, alt = await make_upstream(), await make_upstream()
    up.reply = Reply(status=500, headers={"Content-Type": "application/json"}, chunks=[b"{}"])
    breaker = {"consecutiveFailures": 1, "openMs": 200}
    a, _ = await pair(start_gateway, redis_server, prefix, *two_channels(up, alt, circuitBreaker=breaker))
    assert (await a.post("/v1/messages", data=message_body(), headers=AUTH)).headers["x-ccx-channel"] == "alt"
    await asyncio.sleep(0.25)
    assert (await a.post("/v1/messages", data=message_body(), headers=AUTH)).headers["x-ccx-channel"] == "alt"
    assert len(up.requests) == 2  # the half-open probe went out, and failed
    client = redis_sync.Redis.from_url(redis_server.url)
    try:
        await until(lambda: not client.keys(f"{prefix}probe:*"))  # given back, not left for 70 s
    finally:
        client.close()
