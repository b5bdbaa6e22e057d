"""Randomized soak: a few thousand requests against upstreams that misbehave at
random.  Every request must end in a complete byte-exact stream or a well-formed
error; none may hang."""

import asyncio
import collections
import random
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import AUTH, SSE_BODY, channel, message_body

pytestmark = pytest.mark.slow

REQUESTS = 2000
CONCURRENCY = 64
ERROR_EVENT = b"event: error\ndata: "


def _faulty_upstream(seed: int) -> web.Application:
    rng = random.Random(seed)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        roll = rng.random()
        if roll < 0.08:
            return web.json_response(
                {"type": "error", "error": {"type": "api_error", "message": "boom"}}, status=500
            )
        if roll < 0.14:
            return web.json_response(
                {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
                status=429,
                headers={"retry-after": "0"},
            )
        if roll < 0.18:
            return web.json_response(
                {"type": "error", "error": {"type": "overloaded_error", "message": "o"}}, status=529
            )
        if roll < 0.21:
            return web.json_response(
                {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}, status=400
            )
        if roll < 0.25:
            await asyncio.sleep(0.5)  # past the header timeout
        if roll < 0.28:
            assert request.transport is not None
            request.transport.close()  # drop before any response
            return web.Response()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        cuts = sorted(rng.sample(range(1, len(SSE_BODY)), 3))
        pieces = [SSE_BODY[a:b] for a, b in zip([0, *cuts], [*cuts, len(SSE_BODY)], strict=True)]
        for i, piece in enumerate(pieces):
            if i == 2 and 0.28 <= roll < 0.32:
                assert request.transport is not None
                request.transport.close()  # cut mid-stream
                return response
            if i == 2 and 0.32 <= roll < 0.35:
                await asyncio.sleep(0.5)  # stall mid-stream
            await response.write(piece)
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", handle)
    return app


def _classify(status: int, body: bytes) -> str:
    if status == 200:
        if body == SSE_BODY:
            return "complete"
        at = body.find(ERROR_EVENT)
        assert at > 0 or body.startswith(ERROR_EVENT), body
        prefix = body[:at]
        assert SSE_BODY.startswith(prefix.removesuffix(b"\n\n")), body
        event = orjson.loads(body[at + len(ERROR_EVENT) :])
        assert event["type"] == "error" and body.endswith(b"\n\n")
        return "sse-error-event"
    data = orjson.loads(body)
    assert data["type"] == "error" and data["error"]["type"] and data["error"]["message"]
    return f"error-{status}"


async def test_soak_random_faults(aiohttp_server: Any, start_gateway: Any, capsys: Any) -> None:
    upstreams = [await aiohttp_server(_faulty_upstream(seed)) for seed in (1, 2)]
    client = await start_gateway(
        channel("u1", str(upstreams[0].make_url("")), priority=1),
        channel("u2", str(upstreams[1].make_url("")), priority=2),
        responseHeaderTimeoutMs=200,
        streamInactivityTimeoutMs=200,
        keepaliveMs=0,
        overloadBackoffMs=20,
        rateLimitCooldownMs=20,
        circuitBreaker={
            "consecutiveFailures": 8,
            "failureRateThreshold": 0.9,
            "openMs": 50,
            "maxOpenMs": 200,
        },
    )
    url = str(client.make_url("/v1/messages"))
    counts: collections.Counter[str] = collections.Counter()
    hangs = 0
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal hangs
        async with semaphore:
            try:
                async with asyncio.timeout(10):
                    async with session.post(url, data=message_body(), headers=AUTH) as resp:
                        counts[_classify(resp.status, await resp.read())] += 1
            except TimeoutError:
                hangs += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session) for _ in range(REQUESTS))), 120)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        outcomes = dict(sorted(counts.items()))
        print(f"\nsoak: {REQUESTS} requests in {elapsed:.1f}s, hangs={hangs}, outcomes={outcomes}")
    assert hangs == 0
    assert sum(counts.values()) == REQUESTS
    assert counts["complete"] > REQUESTS * 0.25  # not vacuous: many faults end as full answers
    assert set(counts) <= {
        "complete",
        "sse-error-event",
        "error-400",
        "error-500",
        "error-429",
        "error-529",
        "error-502",
        "error-503",
        "error-504",
    }
