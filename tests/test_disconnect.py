"""Clients that leave mid-stream: the upstream request is aborted promptly and
nothing (connection, task) is left behind."""

import asyncio
import time

import aiohttp

from ccx_proxy.state import GATEWAY
from tests.conftest import AUTH, Reply, channel, message_body

CLIENTS = 300


async def test_hundreds_of_clients_disconnecting_mid_stream_leak_nothing(
    start_gateway, fake_upstream, capsys
) -> None:
    chunks = [b"event: content_block_delta\ndata: {}\n\n"] * 400  # 400 x 50 ms: far longer than the test
    fake_upstream.reply = Reply(chunks=chunks, delay=0.05)
    client = await start_gateway(channel("a", fake_upstream.url))
    gateway = client.server.app[GATEWAY]
    url = str(client.make_url("/v1/messages"))
    baseline_tasks = len(asyncio.all_tasks())

    peak = [0]  # upstream connections open at once: the check below is not vacuous
    flowing = [0]
    all_flowing = asyncio.Event()  # every stream is open before any client leaves

    async def one(session: aiohttp.ClientSession) -> None:
        resp = await session.post(url, data=message_body(), headers=AUTH)
        assert resp.status == 200
        assert await resp.content.readany()  # the stream is flowing...
        flowing[0] += 1
        if flowing[0] == CLIENTS:
            peak[0] = gateway.client.counts()[0]
            all_flowing.set()
        await all_flowing.wait()
        resp.close()  # ...and the client walks away

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session) for _ in range(CLIENTS))), 30)
        left_at = time.monotonic()
        while fake_upstream.aborted < CLIENTS and time.monotonic() - left_at < 5:
            await asyncio.sleep(0.01)
        took = time.monotonic() - left_at
    with capsys.disabled():
        print(
            f"\n{CLIENTS} disconnects: upstream saw {fake_upstream.aborted} aborts after {took * 1000:.0f} ms"
        )
    # Each upstream stream would run 20 s: every one of them ending within the 5 s wait,
    # none completed, means the gateway aborted them (no wall-clock bound on how fast).
    assert fake_upstream.aborted == CLIENTS and fake_upstream.completed == 0

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(asyncio.all_tasks()) > baseline_tasks:
        await asyncio.sleep(0.01)
    assert peak[0] == CLIENTS
    open_, idle = gateway.client.counts()
    assert open_ == idle == 0  # every half-read upstream connection was closed, none reused
    assert len(asyncio.all_tasks()) <= baseline_tasks
    # The client's disconnect is not the upstream's failure.
    health = gateway.health.get("a")
    assert health is not None and health.breaker.consecutive == 0 and health.breaker.failure_rate == 0


async def test_disconnect_while_waiting_for_headers_aborts_the_upstream(start_gateway, fake_upstream) -> None:
    # The upstream would answer after 20 s: only an abort can end it within the test.
    fake_upstream.reply = Reply(before=20, chunks=[b"event: message_stop\ndata: {}\n\n"])
    client = await start_gateway(channel("a", fake_upstream.url))
    url = str(client.make_url("/v1/messages"))
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(url, data=message_body(), headers=AUTH))
        deadline = time.monotonic() + 3
        while not fake_upstream.requests and time.monotonic() < deadline:  # the upstream has it
            await asyncio.sleep(0.01)
        assert fake_upstream.requests
        task.cancel()  # the client gives up before the upstream answers
        await asyncio.gather(task, return_exceptions=True)
    deadline = time.monotonic() + 3
    while fake_upstream.aborted + fake_upstream.completed == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert fake_upstream.aborted == 1 and fake_upstream.completed == 0
    gateway = client.server.app[GATEWAY]
    health = gateway.health.get("a")
    assert health is not None and health.breaker.consecutive == 0
    assert gateway.client.counts() == (0, 0)
