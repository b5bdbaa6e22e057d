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
GRACE = 2.0  # live.GRACE: TTLs a departed instance is kept one by one
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

    async def index_trimmed() -> bool:  # by the next publish of a live instance
        members = await a.server.app[LIVE].store.call("ZRANGE", a.server.app[LIVE].index, 0, -1)
        return bool(members == [instance(a).encode()])

    await until("the expired id leaves the index too", index_trimmed, timeout=3)


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
    merger = live.Merger(grace=10.0)
    a = {"up": {"n": 5, "e": 1, "ttfb": [1] * len(live.TTFB_LE), "tok": [10, 20, 0, 0, 0], "ok": 1}}
    b = {"up": {"n": 2, "e": 0, "ok": 0}, "": {"n": 1, "e": 1}}
    merger.see("a", a, 0.0)
    merger.see("b", b, 0.0)
    totals = merger.totals(1.0)
    snap = live.merged_snapshot(totals, [{"ch": a, "streams": 2}, {"ch": b, "streams": 1}], 1.0, 1.0)
    assert snap.requests == {"up": 7.0, "": 1.0} and snap.errors == {"up": 1.0, "": 1.0}
    assert snap.available == {"up": 0.0} and snap.streams == 3
    assert snap.output == {"up": 20.0} and snap.ttfb["up"][float("inf")] == 1.0
    # b is gone: its counters stay (folded after the grace), availability is a's alone
    merger.see("a", a, 11.0)
    totals = merger.totals(11.0)
    assert list(merger.known) == ["a"] and merger.departed["up"]["n"] == 2
    snap = live.merged_snapshot(totals, [{"ch": a, "streams": 2}], 3.0, 3.0)
    assert snap.requests["up"] == 7.0 and snap.available == {"up": 1.0} and snap.streams == 2
    # a snapshot of another layout does not break the sum
    live._add(totals, {"up": {"n": "x", "ttfb": [1, 2]}, "odd": "not a row"})
    assert totals["up"]["n"] == 7 and len(totals["up"]["ttfb"]) == len(live.TTFB_LE)


# ------------------------------------------------------------------ bounded reads and index


async def test_the_overview_reads_outside_the_request_pipeline(
    start: Callable[[RedisServer], Start], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing and MGETs of the snapshots (and the publishing) take their own round trips,
    never a batch of the pipeline that member limits share on the request path."""
    a, b = await start(redis_server)(), await start(redis_server)()
    store = a.server.app[LIVE].store
    batches: list[list[str]] = []
    pipeline = store._pipeline

    async def recording(redis: Any, batch: list[Any], deadline: float) -> list[Any]:
        batches.append([str(args[0]) for args, _ in batch])
        return await pipeline(redis, batch, deadline)

    monkeypatch.setattr(store, "_pipeline", recording)
    await until("A lists B", lambda: _listed(a, {instance(a), instance(b)}))
    for _ in range(5):
        assert (await overview(a))["redis"] == "up"
    await asyncio.sleep(0.3)  # a few of A's own publishes too
    commands = {command for batch in batches for command in batch}
    assert not commands & {"MGET", "SMEMBERS", "ZRANGE", "ZRANGEBYSCORE", "EVAL", "SET"}, batches


async def _listed(client: Client, ids: set[str]) -> bool:
    return {i["id"] for i in (await overview(client))["instances"]} == ids


async def test_departed_instances_are_folded_after_the_grace(
    start: Callable[[RedisServer], Start], redis_server: RedisServer
) -> None:
    """A dead instance's numbers are kept one by one for GRACE TTLs, then only in the sum of
    the departed: still counted, no longer a row per channel."""
    a, b = await start(redis_server)(), await start(redis_server)()
    finished = Finished(b)
    assert await post(b, "claude-alpha") == 200
    await finished.wait(1)
    await until("A counts B's request", lambda: _requests_are(a, 1))
    merger = a.server.app[LIVE].merger
    assert instance(b) in merger.known

    b.server.app[LIVE]._task.cancel()  # type: ignore[union-attr]  # B dies: its key expires
    started = time.monotonic()

    async def folded() -> bool:
        assert (await overview(a))["totals"]["requests"] == 1  # counted all along
        return instance(b) not in merger.known

    await until("B is folded", folded, timeout=TTL * (GRACE + 1) + 2)
    assert time.monotonic() - started >= TTL * GRACE  # not before the grace
    assert live.GRACE == GRACE and merger.folded == 1 and merger.departed["up"]["n"] == 1
    assert set(merger.known) == {instance(a)}


def test_a_merge_costs_the_live_instances_not_every_departed_one() -> None:
    merger = live.Merger(grace=10.0)
    row = {"n": 1, "e": 0, "ttfb": [1] * len(live.TTFB_LE), "tok": [1] * len(live.TOKEN_TYPES), "ok": 1}
    channels = {f"c{i}": dict(row) for i in range(50)}
    for i in range(live.MAX_REMEMBERED + 10):
        merger.see(f"dead{i}", channels, 0.0)
    assert len(merger.known) == live.MAX_REMEMBERED + 10  # within the grace: one by one
    merger.see("alive", channels, 11.0)
    totals = merger.totals(11.0)
    assert list(merger.known) == ["alive"] and merger.folded == live.MAX_REMEMBERED + 10
    assert (
        totals["c0"]["n"] == live.MAX_REMEMBERED + 11 and totals["c0"]["ttfb"][0] == live.MAX_REMEMBERED + 11
    )
    merger.see("alive", channels, 12.0)
    assert merger.totals(12.0)["c0"]["n"] == live.MAX_REMEMBERED + 11  # nothing counted twice


async def test_the_index_stays_bounded_without_readers(
    start: Callable[[RedisServer], Start], redis_server: RedisServer, prefix: str
) -> None:
    """Processes that start and die while nobody opens the Overview: the index keeps only
    the ids published within the TTL (every publisher trims it)."""
    a = await start(redis_server)()
    exporter = a.server.app[LIVE].exporter
    index = a.server.app[LIVE].index
    for i in range(20):  # twenty short-lived processes, none of which stops cleanly
        store = SharedStore(RedisSettings(redis_server.url, prefix=prefix), instance=f"dead-{i}")
        await store.start()
        try:
            await LiveFeed(store, exporter).publish()
        finally:
            await store.stop()
    store = a.server.app[LIVE].store
    assert await store.call("ZCARD", index) >= 20

    async def only_a() -> bool:
        return bool(await store.call("ZRANGE", index, 0, -1) == [instance(a).encode()])

    await until("the dead ids are trimmed by A's publishing", only_a, timeout=TTL + 2)


async def test_instances_beyond_the_read_bounds_are_reported(
    start: Callable[[RedisServer], Start],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = [await start(redis_server)() for _ in range(3)]
    await until("A lists all three", lambda: _listed(a, {instance(a), instance(b), instance(c)}))
    finished = [Finished(b), Finished(c)]
    assert await post(b, "claude-alpha") == 200 and await post(c, "claude-alpha") == 200
    for f in finished:
        await f.wait(1)
    await until("A counts both", lambda: _requests_are(a, 2))

    monkeypatch.setattr(live, "MAX_INSTANCES", 1)  # A reads one other's snapshot
    with caplog.at_level("WARNING", logger="ccx_proxy.shared.live"):
        views = [await overview(a) for _ in range(3)]
    first = min(instance(b), instance(c))
    for view in views:
        assert [i["id"] for i in view["instances"]] == [instance(a), first]
        assert view["instancesOmitted"] == 1 and "1 more instances not read" in view["notice"]
        assert view["totals"]["requests"] == 2  # the omitted one's last numbers still count
    assert sum("not read" in r.getMessage() for r in caplog.records) == 1  # at most once a minute

    monkeypatch.setattr(live, "MAX_INSTANCES", 256)
    monkeypatch.setattr(live, "MAX_READ_BYTES", 1)  # the bytes bound: one snapshot, then no more
    view = await overview(a)
    assert len(view["instances"]) == 2 and view["instancesOmitted"] == 1
    monkeypatch.setattr(live, "MAX_READ_BYTES", 1 << 22)
    view = await overview(a)
    assert len(view["instances"]) == 3 and view["instancesOmitted"] == 0 and view["notice"] is None


async def test_an_instance_back_after_a_gap_is_not_counted_twice(
    start: Callable[[RedisServer], Start], redis_server: RedisServer
) -> None:
    """B stops publishing long enough for A to fold its numbers, then comes back: it goes on
    under a new id with only what it counted since, so A counts each request once."""
    a, b = await start(redis_server)(), await start(redis_server)()
    finished = Finished(b)
    assert [await post(b, "claude-alpha") for _ in range(2)] == [200, 200]
    await finished.wait(2)
    await until("A counts B's 2", lambda: _requests_are(a, 2))
    feed_b = b.server.app[LIVE]
    feed_b._task.cancel()  # type: ignore[union-attr]  # B stalls (alive, not publishing)
    merger = a.server.app[LIVE].merger

    async def folded() -> bool:
        assert (await overview(a))["totals"]["requests"] == 2
        return instance(b) not in merger.known

    await until("A folds B", folded, timeout=TTL * (GRACE + 1) + 2)
    feed_b._task = asyncio.get_running_loop().create_task(feed_b.run())  # B is back
    back = f"{instance(b)}~1"
    await until("A lists B's new id", lambda: _listed(a, {instance(a), back}))
    assert (await overview(a))["totals"]["requests"] == 2  # not 4
    assert (await overview(b))["totals"]["requests"] == 2
    assert await post(b, "claude-alpha") == 200
    await finished.wait(3)
    await until("A counts B's third", lambda: _requests_are(a, 3))
    await until("B counts its third", lambda: _requests_are(b, 3))
