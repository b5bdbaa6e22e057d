"""The issue's fleet check, for real: two gateway processes with ``--workers 2`` each (four
workers), one Redis, one members database, upstreams in the test process.

* an rpm limit of 30 admits exactly 30 across all of them;
* a concurrency limit of 2 holds across processes, and the slot of a process killed with
  SIGKILL is free again within ``REDIS_SLOT_TTL_S``;
* a 429 seen by one process cools the (key, model) down for the other;
* a session pinned on one is pinned on the other;
* the console (``/api/overview``) on either shows both processes' traffic;
* Redis stopped mid-run: requests keep flowing on local state (logged); Redis back: shared
  limits resume.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ccx_proxy.mock_upstream import MockUpstream
from tests.conftest import UPSTREAM_KEY, unused_port
from tests.redis_server import RedisServer

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT: Linux"),
    pytest.mark.timeout(90),
]
ACCESS = "fleet-shared-key-0123456789"
ADMIN = "fleet-admin-key-0123456789"
SLOT_TTL = 2
BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 8,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


@dataclass
class Upstream:
    """The built-in mock upstream, plus a switch that makes it answer 429 or 500."""

    server: Any = None
    fail_with: int = 0
    requests: int = 0

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


async def start_upstream(aiohttp_server: Any) -> Upstream:
    upstream = Upstream()

    @web.middleware
    async def switch(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/v1/messages"):
            upstream.requests += 1
            if upstream.fail_with:
                headers = {"retry-after": "30"} if upstream.fail_with == 429 else {}
                return web.json_response({"type": "error", "error": {"type": "x", "message": "no"}},
                                         status=upstream.fail_with, headers=headers)  # fmt: skip
        return await handler(request)

    app = MockUpstream(UPSTREAM_KEY).app()
    app.middlewares.append(switch)
    upstream.server = await aiohttp_server(app)
    return upstream


@dataclass
class Fleet:
    ports: list[int]
    procs: list[subprocess.Popen[str]]
    keys: dict[str, str] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)

    def url(self, index: int, path: str = "/v1/messages") -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def log(self, index: int) -> str:
        return self.logs[index].read_text()


def _env(redis: RedisServer, prefix: str, data_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_URL", "WORKERS", "PORT"))
    }
    return {
        **env,
        "PROXY_ACCESS_KEY": ACCESS,
        "ADMIN_ACCESS_KEY": ADMIN,
        "REDIS_URL": redis.url,
        "REDIS_PREFIX": prefix,
        "REDIS_SLOT_TTL_S": str(SLOT_TTL),
        # These tests are about what is shared, not about slow round trips (tests/shared/
        # test_client.py covers those): on a loaded CI machine a 50 ms deadline sometimes
        # passes, and that one request would be counted locally (fail-open) instead.
        "REDIS_TIMEOUT_MS": "2000",
        "DATA_DIR": str(data_dir),
        "LOG_LEVEL": "INFO",
    }


async def _ready(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"gateway on {port} exited"
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway on {port} did not start")


@pytest.fixture
async def make_fleet(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> AsyncIterator[Callable[..., Awaitable[Fleet]]]:
    fleets: list[Fleet] = []

    async def make(up: Upstream, alt: Upstream, redis: RedisServer | None = None, **limits: str) -> Fleet:
        redis = redis or redis_server
        data_dir = tmp_path / "data"
        config = tmp_path / "channels.json"
        config.write_text(json.dumps({"channels": [
            {"name": "up", "baseUrl": up.url, "apiKeys": [UPSTREAM_KEY], "priority": 1,
             "circuitBreaker": {"enabled": False}},
            {"name": "alt", "baseUrl": alt.url, "apiKeys": [UPSTREAM_KEY], "priority": 2},
        ]}))  # fmt: skip
        env = _env(redis, prefix, data_dir)
        fleet = Fleet([], [])
        for name, flags in limits.items():
            out = subprocess.run(
                [sys.executable, "-m", "ccx_proxy", "members", "add", name, *flags.split()],
                env=env, capture_output=True, text=True, check=True, timeout=30,
            )  # fmt: skip
            fleet.keys[name] = out.stdout.strip().splitlines()[-1]
        for index in range(2):
            port = unused_port()
            log = tmp_path / f"gateway{index}.log"
            with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(
                    [sys.executable, "-m", "ccx_proxy", "serve", "--workers", "2", "--port", str(port),
                     "--config", str(config)],
                    stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env, start_new_session=True,
                )  # fmt: skip
            fleet.ports.append(port)
            fleet.procs.append(proc)
            fleet.logs.append(log)
        fleets.append(fleet)
        for port, proc in zip(fleet.ports, fleet.procs, strict=True):
            await _ready(port, proc)
        await asyncio.sleep(0.5)  # the second worker of each, and their Redis subscriptions
        return fleet

    yield make
    for fleet in fleets:
        for proc in fleet.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in fleet.procs:
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


async def post(url: str, key: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """One request on a connection of its own (so the kernel spreads them over workers)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(url, json=BODY, headers={"x-api-key": key, **(headers or {})}) as response:
            return response.status, response.headers.get("x-ccx-channel", ""), await response.read()


async def _until_in_redis(server: RedisServer, condition: Callable[[Any], Any], within: float = 5) -> None:
    import redis as redis_sync

    with redis_sync.Redis.from_url(server.url) as client:
        deadline = time.monotonic() + within
        while not condition(client):
            assert time.monotonic() < deadline, "not in Redis in time"
            await asyncio.sleep(0.02)


async def test_rpm_30_admits_exactly_30_across_two_processes_of_two_workers(
    aiohttp_server: Any, make_fleet: Callable[..., Awaitable[Fleet]]
) -> None:
    up, alt = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    fleet = await make_fleet(up, alt, alice="--rpm 30")
    key = fleet.keys["alice"]
    results = []
    for batch in range(6):  # 60 requests, 10 at a time, half to each process
        results += await asyncio.gather(*(post(fleet.url(i % 2), key) for i in range(10)))
        assert batch < 3 or all(r[0] == 429 for r in results[-10:])
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 30 and statuses.count(429) == 30
    refused = next(body for status, _, body in results if status == 429)
    assert b"30 requests per minute across the gateway's instances" in refused
    assert up.requests == 30


async def test_concurrency_2_holds_across_processes_and_a_killed_holder_frees_its_slot(
    aiohttp_server: Any, make_fleet: Callable[..., Awaitable[Fleet]], redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    fleet = await make_fleet(up, alt, bob="--max-concurrent 2")
    key = fleet.keys["bob"]
    slow = {"x-mock-deltas": "100", "x-mock-delay-ms": "200"}  # 20 s streams
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) for _ in range(2)]
    streams: list[aiohttp.ClientResponse] = []
    try:
        for index, session in enumerate(sessions):  # one stream held on each process
            response = await session.post(fleet.url(index), json=BODY, headers={"x-api-key": key, **slow})
            assert response.status == 200
            await response.content.readline()
            streams.append(response)
        for index in range(2):  # a third, on either process: refused
            status, _, body = await post(fleet.url(index), key)
            assert status == 429 and b"2 requests at once across the gateway's instances" in body
        # Process 0 dies outright, its workers included (a worker whose supervisor dies
        # drains: SIGKILL them first, so the stream's slot is never released).
        supervisor = fleet.procs[0].pid
        workers = [int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()]
        assert len(workers) == 2
        for pid in (*workers, supervisor):
            os.kill(pid, signal.SIGKILL)
        fleet.procs[0].wait(10)
        killed = time.monotonic()
        status, _, _ = await post(fleet.url(1), key)
        assert status == 429  # not released by anyone: it must expire
        while True:
            status, _, _ = await post(fleet.url(1), key)
            if status == 200:
                break
            assert status == 429
            assert time.monotonic() - killed < SLOT_TTL + 3, "the dead process's slot never expired"
            await asyncio.sleep(0.2)
        assert time.monotonic() - killed <= SLOT_TTL + 3
        # That request's slot is given back just after its response (fire and forget, from
        # whichever worker served it): wait until only the stream on process 1 holds one.
        await _until_in_redis(redis_server, lambda client: client.zcard(f"{prefix}lim:{{bob}}:slots") == 1)
        # The stream on process 1 still holds its slot (refreshed): one more is refused.
        slow_one = await sessions[0].post(fleet.url(1), json=BODY, headers={"x-api-key": key, **slow})
        streams.append(slow_one)
        assert slow_one.status == 200
        await slow_one.content.readline()
        status, _, _ = await post(fleet.url(1), key)
        assert status == 429
    finally:
        for response in streams:
            response.close()
        for session in sessions:
            await session.close()


async def test_a_429_on_one_process_cools_the_key_for_the_other(
    aiohttp_server: Any, make_fleet: Callable[..., Awaitable[Fleet]], redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    fleet = await make_fleet(up, alt)
    up.fail_with = 429
    status, channel, _ = await post(fleet.url(0), ACCESS)
    assert (status, channel) == (200, "alt") and up.requests == 1
    up.fail_with = 0
    # The cool-down is stored and published by one script (sent just after the response):
    # once it is stored, the message is on its way to every worker.
    await _until_in_redis(redis_server, lambda client: client.hlen(f"{prefix}health") > 0)
    await asyncio.sleep(0.3)  # the message reaches every worker
    for _ in range(8):  # spread over both workers of process 1 (and process 0's other one)
        for index in (1, 0):
            status, channel, _ = await post(fleet.url(index), ACCESS)
            assert (status, channel) == (200, "alt")
    assert up.requests == 1  # nobody sent the cooled (key, model) another request


async def test_a_session_pinned_on_one_process_is_pinned_on_the_other(
    aiohttp_server: Any, make_fleet: Callable[..., Awaitable[Fleet]], redis_server: RedisServer, prefix: str
) -> None:
    up, alt = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    fleet = await make_fleet(up, alt)
    session = {"x-claude-code-session-id": "fleet-session"}
    up.fail_with = 500  # the session's first request fails over to alt
    status, channel, _ = await post(fleet.url(0), ACCESS, session)
    assert (status, channel) == (200, "alt")
    up.fail_with = 0
    await _until_in_redis(redis_server, lambda client: client.exists(f"{prefix}aff:h:fleet-session"))
    for _ in range(4):
        status, channel, _ = await post(fleet.url(1), ACCESS, session)
        assert (status, channel) == (200, "alt")  # up is first and healthy; the session is on alt
    status, channel, _ = await post(fleet.url(1), ACCESS, {"x-claude-code-session-id": "other"})
    assert (status, channel) == (200, "up")


async def test_the_console_on_either_process_shows_both_processes_traffic(
    aiohttp_server: Any, make_fleet: Callable[..., Awaitable[Fleet]]
) -> None:
    up, alt = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    fleet = await make_fleet(up, alt)
    for _ in range(6):  # 6 through process 0 only, over both of its workers
        assert (await post(fleet.url(0), ACCESS))[0] == 200

    async def overview(index: int) -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.get(
                fleet.url(index, "/api/overview"), headers={"x-api-key": ADMIN}
            ) as response:
                assert response.status == 200
                return dict(await response.json())

    deadline = time.monotonic() + 10
    while True:  # every worker publishes its own numbers once a second
        views = [await overview(1), await overview(0)]
        if all(v["totals"]["requests"] == 6 and len(v["instances"] or ()) == 4 for v in views):
            break
        assert time.monotonic() < deadline, [(v["totals"]["requests"], v["instances"]) for v in views]
        await asyncio.sleep(0.2)
    for view in views:  # process 1 served nothing, and shows process 0's traffic
        assert view["redis"] == "up" and view["workers"] == "instances"
        pids = {i["pid"] for i in view["instances"]}
        assert len(pids) == 4  # two processes with two workers each, each counted once


async def test_redis_stopped_mid_run_fails_open_and_resumes(
    aiohttp_server: Any, make_fleet: Callable[..., Awaitable[Fleet]], own_redis: RedisServer
) -> None:
    up, alt = await start_upstream(aiohttp_server), await start_upstream(aiohttp_server)
    fleet = await make_fleet(up, alt, redis=own_redis, carol="--rpm 1000")
    key = fleet.keys["carol"]
    assert (await post(fleet.url(0), key))[0] == 200
    own_redis.stop()
    for index in (0, 1, 0, 1, 0, 1):  # every worker notices, none stops serving
        assert (await post(fleet.url(index), key))[0] == 200
    for index in (0, 1):
        text = fleet.log(index)
        assert "Redis unreachable" in text and "fall back to this process's own" in text
    own_redis.start()

    def reconnected(index: int) -> bool:
        # Every worker that logged going down logs coming back (each on its own back-off).
        text = fleet.log(index)
        return text.count("Redis answers again") >= text.count("Redis unreachable (") > 0

    deadline = time.monotonic() + 15
    while not all(reconnected(i) for i in (0, 1)):
        assert time.monotonic() < deadline, "not every worker reconnected"
        await asyncio.sleep(0.1)
    # Counted in Redis again: the rpm window holds what came after the restart (Redis came
    # back empty). Each request goes to whichever worker the kernel picks, so a few are sent.
    import redis as redis_sync

    client = redis_sync.Redis.from_url(own_redis.url)
    try:
        for attempt in range(8):
            assert (await post(fleet.url(attempt % 2), key))[0] == 200
        keys = client.keys("*lim:{carol}:rpm")
        assert keys and client.zcard(keys[0]) == 8, "admissions after the restart not counted in Redis"
    finally:
        client.close()
