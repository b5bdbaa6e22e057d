"""Live numbers shared through a real Redis: two gateways in one test process, each with its
own SharedStore (its own instance id), publishing every 0.1 s with a 1 s expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import values

from ccx_proxy.ops.metrics import MULTIPROC_ENV, Exporter
from ccx_proxy.settings import RedisSettings
from ccx_proxy.shared import live
from ccx_proxy.shared.client import SharedStore
from ccx_proxy.shared.live import LIVE, LiveFeed
from ccx_proxy.state import GATEWAY
from ccx_proxy.upstream import attempt
from tests.conftest import (
    AUTH,
    FakeUpstream,
    GatewayFactory,
    Recorded,
    Reply,
    channel,
    make_settings,
    message_body,
)
from tests.ops.test_metrics import Finished, _record, parse
from tests.redis_server import RedisServer

ADMIN = {"x-api-key": "admin-key-0123456789"}
JSON = {"Content-Type": "application/json"}
TTL = 1.0
Client = TestClient[Any, Any]


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots every 0.1 s that expire after 1 s; fresh attempt counts; no metrics env."""
    monkeypatch.setattr(live, "PUBLISH_INTERVAL", 0.1)
    monkeypatch.setattr(live, "TTL", TTL)
    monkeypatch.setattr(attempt, "COUNTS", {})
    for name in ("METRICS_TOKEN", "METRICS_PUBLIC", "METRICS_PER_MEMBER", MULTIPROC_ENV):
        monkeypatch.delenv(name, raising=False)


def _reply(recorded: Recorded) -> Reply:
    if recorded.json()["model"] == "up-failing":
        body = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": "upstream 500"}})
        return Reply(status=500, headers=JSON, chunks=[body])
    body = orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "up-alpha",
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 100, "output_tokens": 20},
        }
    )
    return Reply(headers=JSON, chunks=[body])


Start = Callable[[], Awaitable[Client]]


@pytest.fixture
def start(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, prefix: str
) -> Callable[[RedisServer], Start]:
    """``start(server)()``: one more gateway on ``server`` with this test's prefix."""
    fake_upstream.reply = _reply

    def on(server: RedisServer) -> Start:
        async def one() -> Client:
            redis = RedisSettings(server.url, prefix=prefix, timeout=0.5)  # a busy CI box: no false downs
            settings = make_settings(admin_keys=(ADMIN["x-api-key"],), redis=redis)
            mapping = {"alpha": "up-alpha", "failing": "up-failing"}
            return await start_gateway(
                channel("up", fake_upstream.url, modelMapping=mapping), settings=settings
            )

        return one

    return on


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def overview(client: Client) -> dict[str, Any]:
    resp = await client.get("/api/overview", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    view: dict[str, Any] = await resp.json()
    return view


async def post(client: Client, model: str) -> int:
    resp = await client.post("/v1/messages", data=message_body(model, stream=False), headers=AUTH)
    await resp.read()
    return resp.status


def instance(client: Client) -> str:
    return client.server.app[LIVE].store.instance


async def test_either_console_shows_both_instances_traffic(
    start: Callable[[RedisServer], Start], redis_server: RedisServer, fake_upstream: FakeUpstream
) -> None:
    a, b = await start(redis_server)(), await start(redis_server)()
    ids = {instance(a), instance(b)}
    assert len(ids) == 2

    async def both_listed() -> bool:
        views = [await overview(a), await overview(b)]
        return all({i["id"] for i in v["instances"]} == ids for v in views)

    await until("both instances are listed on both", both_listed)
    view = await overview(a)
    assert view["redis"] == "up" and view["notice"] is None and view["workers"] == "instances"
    me, other = view["instances"]
    assert (me["id"], me["self"], other["id"], other["self"]) == (instance(a), True, instance(b), False)
    assert other["host"] == me["host"] and other["pid"] == me["pid"]  # one test process
    assert 0 <= other["ageS"] <= TTL and other["redisUp"] is True and other["activeStreams"] == 0

    finished_a, finished_b = Finished(a), Finished(b)
    assert [await post(a, "claude-alpha") for _ in range(3)] == [200, 200, 200]  # through A only
    await finished_a.wait(3)

    async def totals(client: Client, requests: int) -> bool:
        return bool((await overview(client))["totals"]["requests"] == requests)

    assert await totals(a, 3)  # its own numbers: fresh from memory
    await until("B shows A's 3 requests", lambda: totals(b, 3))

    assert await post(b, "claude-alpha") == 200  # then through B
    assert await post(b, "claude-failing") >= 500
    await finished_b.wait(2)
    await until("A shows 5", lambda: totals(a, 5))
    await until("B shows 5", lambda: totals(b, 5))
    for client in (a, b):
        view = await overview(client)
        row = next(c for c in view["channels"] if c["name"] == "up")
        assert row["requests"] == 5 and row["available"] is True
        assert view["fleet"]["tokens"]["output"] == 80 and view["fleet"]["tokens"]["input"] == 400

    # A stream held open on B: A's console counts it, on B's line.
    gate = asyncio.Event()

    async def held(i: int) -> None:
        await gate.wait()

    fake_upstream.reply = Reply(chunks=[b"event: ping\ndata: {}\n\n", b""], gate=held)
    streaming = asyncio.ensure_future(b.post("/v1/messages", data=message_body("claude-alpha"), headers=AUTH))

    async def a_sees_the_stream() -> bool:
        view = await overview(a)
        lines = {i["id"]: i["activeStreams"] for i in view["instances"]}
        return bool(view["totals"]["activeStreams"] == 1 and lines[instance(b)] == 1)

    try:
        await until("A sees B's stream", a_sees_the_stream)
    finally:
        gate.set()
        (await streaming).close()
        fake_upstream.reply = _reply

    # A channel B backs off from: unavailable on both consoles (the worst view).
    gw_b = b.server.app[GATEWAY]
    gw_b.health.channel("up", gw_b.runtime.config.channels[0].breaker).backoff_until = (
        gw_b.health.clock() + 60
    )

    async def unavailable(client: Client) -> bool:
        view = await overview(client)
        return bool(view["channels"][0]["available"] is False and view["totals"]["channelsAvailable"] == 0)

    await until("A shows the channel unavailable", lambda: unavailable(a))
    assert await unavailable(b)


async def test_an_instance_that_stops_leaves_the_list(
    start: Callable[[RedisServer], Start], redis_server: RedisServer
) -> None:
    a, b, c = [await start(redis_server)() for _ in range(3)]
    everyone = {instance(a), instance(b), instance(c)}

    async def listed() -> set[str]:
        return {i["id"] for i in (await overview(a))["instances"]}

    async def all_listed() -> bool:
        return await listed() == everyone

    await until("three instances listed", all_listed)
    finished = Finished(b)
    assert await post(b, "claude-alpha") == 200
    await finished.wait(1)
    await until("A counts B's request", lambda: _requests_are(a, 1))

    await c.close()  # a clean stop deletes its snapshot: gone at once, not after the expiry
    assert await listed() == {instance(a), instance(b)}

    b.server.app[LIVE]._task.cancel()  # type: ignore[union-attr]  # B dies: its key is left to expire
    started = time.monotonic()
    await until("B's snapshot expires", lambda: _eq(listed(), {instance(a)}), timeout=TTL + 2)
    assert time.monotonic() - started <= TTL + 1
    view = await overview(a)
    assert view["totals"]["requests"] == 1  # what a departed instance did still counts
    members = await a.server.app[LIVE].store.call("SMEMBERS", a.server.app[LIVE].index)
    assert members == {instance(a).encode()}  # the expired id left the index too


async def _requests_are(client: Client, n: int) -> bool:
    return bool((await overview(client))["totals"]["requests"] == n)


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_redis_down_shows_this_host_only_and_metrics_say_so(
    start: Callable[[RedisServer], Start], own_redis: RedisServer
) -> None:
    a, b = await start(own_redis)(), await start(own_redis)()
    finished_a, finished_b = Finished(a), Finished(b)
    assert await post(a, "claude-alpha") == 200
    assert [await post(b, "claude-alpha") for _ in range(2)] == [200, 200]
    await finished_a.wait(1)
    await finished_b.wait(2)
    await until("A shows 3", lambda: _requests_are(a, 3))
    m = parse(await (await a.get("/metrics", headers=ADMIN)).text())
    assert m["ccx_redis_up"] == {(): 1.0}
    errors = m["ccx_redis_errors_total"][()]
    fallbacks = m["ccx_redis_fallbacks_total"][()]

    own_redis.stop()
    store = a.server.app[LIVE].store
    await until("A's next snapshot finds Redis down", lambda: _true(not store.up))
    view = await overview(a)
    assert view["redis"] == "down" and view["notice"] == "Redis down: this host only"
    assert view["instances"] is None and view["workers"] == "this process"
    assert view["totals"]["requests"] == 1  # its own numbers only
    m = parse(await (await a.get("/metrics", headers=ADMIN)).text())
    assert m["ccx_redis_up"] == {(): 0.0}
    assert m["ccx_redis_errors_total"][()] > errors
    assert m["ccx_redis_fallbacks_total"][()] > fallbacks  # the overview that fell back
    assert m["ccx_redis_state_changes_total"][()] >= 1

    own_redis.start()  # back: the fleet's numbers again (B republishes as it reconnects)
    back: list[dict[str, Any]] = []

    async def fleet_again() -> bool:
        back.append(await overview(a))
        return bool(back[-1]["redis"] == "up")

    await until("A's console shows the fleet again", fleet_again, timeout=10)
    assert back[-1]["window"] is None  # a new ring: no rate across the switch
    await until("A shows 3 again", lambda: _requests_are(a, 3))


async def _true(value: bool) -> bool:
    return value


async def test_redis_metrics_only_with_redis_url(
    start_gateway: GatewayFactory, start: Callable[[RedisServer], Start], redis_server: RedisServer
) -> None:
    plain = await start_gateway(channel("up"), settings=make_settings(admin_keys=(ADMIN["x-api-key"],)))
    text = await (await plain.get("/metrics", headers=ADMIN)).text()
    assert "ccx_redis" not in text
    view = await overview(plain)
    assert "redis" not in view and "instances" not in view and view["workers"] == "this process"

    shared = await start(redis_server)()
    text = await (await shared.get("/metrics", headers=ADMIN)).text()
    for name, kind in (
        ("ccx_redis_up", "gauge"),
        ("ccx_redis_errors_total", "counter"),
        ("ccx_redis_fallbacks_total", "counter"),
        ("ccx_redis_state_changes_total", "counter"),
        ("ccx_redis_dropped_total", "counter"),
    ):
        assert f"# TYPE {name} {kind}\n" in text and f"# HELP {name} " in text, name
        assert f"\n{name} " in text, name


async def test_a_worker_publishes_its_own_numbers_not_the_hosts(
    start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --workers N the overview's host view sums every worker's files; what a worker
    shares through Redis is its own part only, so the fleet counts each worker once."""
    directory = tmp_path / "metrics"
    settings = make_settings(admin_keys=(ADMIN["x-api-key"],))
    gateways = [(await start_gateway(channel("a"), settings=settings)).server.app[GATEWAY] for _ in range(2)]
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    classes = [values.MultiProcessValue(lambda: 201), values.MultiProcessValue(lambda: 202)]
    env = {MULTIPROC_ENV: str(directory)}
    workers = [Exporter(gw, env, value_class=c) for gw, c in zip(gateways, classes, strict=True)]
    try:
        one, two = workers
        for _ in range(3):
            one.meter.observe(_record("a", "m1"))
        two.meter.observe(_record("a", "m1"))
        two.publish()
        host = parse_families(await one.families())
        assert host["ccx_requests_total"] == 4  # the host: both workers
        store = SharedStore(RedisSettings("redis://127.0.0.1:1/0"), instance="w1")  # never started
        own = LiveFeed(store, one).own()
        assert own["ch"]["a"]["n"] == 3 and own["ch"]["a"]["ttfb"][-1] == 3  # worker 1's own
        assert "ccx_redis_up" not in host  # no REDIS_URL on these exporters
    finally:
        for value_class in classes:
            value_class.close_all_files()


def parse_families(families: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_availability_is_the_worst_and_departed_counters_stay() -> None:
    merger = live.Merger()
    a = {"up": {"n": 5, "e": 1, "ttfb": [1] * len(live.TTFB_LE), "tok": [10, 20, 0, 0, 0], "ok": 1}}
    b = {"up": {"n": 2, "e": 0, "ok": 0}, "": {"n": 1, "e": 1}}
    merger.see("a", a, 0.0)
    merger.see("b", b, 0.0)
    totals = merger.totals(1.0)
    snap = live.merged_snapshot(totals, [{"ch": a, "streams": 2}, {"ch": b, "streams": 1}], 1.0, 1.0)
    assert snap.requests == {"up": 7.0, "": 1.0} and snap.errors == {"up": 1.0, "": 1.0}
    assert snap.available == {"up": 0.0} and snap.streams == 3
    assert snap.output == {"up": 20.0} and snap.ttfb["up"][float("inf")] == 1.0
    # b is gone: its counters stay (folded once forgotten), availability is a's alone
    merger.see("a", a, 2.0 + live.FORGET_AFTER)
    totals = merger.totals(2.0 + live.FORGET_AFTER)
    assert list(merger.known) == ["a"] and merger.forgotten["up"]["n"] == 2
    snap = live.merged_snapshot(totals, [{"ch": a, "streams": 2}], 3.0, 3.0)
    assert snap.requests["up"] == 7.0 and snap.available == {"up": 1.0} and snap.streams == 2
    # a snapshot of another layout does not break the sum
    live._add(totals, {"up": {"n": "x", "ttfb": [1, 2]}, "odd": "not a row"})
    assert totals["up"]["n"] == 7 and len(totals["up"]["ttfb"]) == len(live.TTFB_LE)
