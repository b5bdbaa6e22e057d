"""Graceful drain and /ready: in process (the drain driven directly, on a real listening
socket) and with real ``ccx-proxy serve`` processes (one, and ``--workers 2``) on SIGTERM.

The upstream holds each stream after its first event until the test lets it go (a gate per
stream), so nothing here waits on a sleep to line events up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from ccx_proxy.app import create_app
from ccx_proxy.errors import sse_error_event
from ccx_proxy.ops import drain
from ccx_proxy.ops.drain import DRAIN, SHUTTING_DOWN, drain_timeout
from ccx_proxy.server import install, server_kwargs
from ccx_proxy.state import GATEWAY

from ..conftest import (
    ACCESS_KEY,
    FakeUpstream,
    Recorded,
    Reply,
    assert_anthropic_error,
    channel,
    make_config,
    make_settings,
    message_body,
    unused_port,
)
from .test_systemd import KEY, NotifySocket, serve_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, unix sockets: Linux")

START = b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_d","model":"m"}}\n\n'
DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"still here"}}\n\n'
)
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
SHUTDOWN_EVENT = sse_error_event("overloaded_error", SHUTTING_DOWN)


class Gates:
    """The upstream sends each stream's first event, then waits for the test to open its gate
    (keyed by the user message): one that is never opened holds its stream open."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}

    def _event(self, table: dict[str, asyncio.Event], name: str) -> asyncio.Event:
        return table.setdefault(name, asyncio.Event())

    def reply(self, recorded: Recorded) -> Reply:
        name = recorded.json()["messages"][0]["content"]

        async def gate(index: int) -> None:
            self._event(self.started, name).set()
            await self._event(self.events, name).wait()

        return Reply(chunks=[START, DELTA, STOP], gate=gate)

    def open(self, name: str) -> None:
        self._event(self.events, name).set()


@pytest.fixture
async def upstream(make_upstream: Callable[[], Awaitable[FakeUpstream]]) -> tuple[FakeUpstream, Gates]:
    fake = await make_upstream()
    gates = Gates()
    fake.reply = gates.reply
    return fake, gates


# -- a raw HTTP/1.1 client: keep-alive connections and exact bytes -------------------------


class Conn:
    opened: list[Conn] = []  # closed after each test (close_connections)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        Conn.opened.append(self)

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, method: str, path: str, body: bytes = b"", key: str = ACCESS_KEY) -> None:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nx-api-key: {key}\r\n"
            f"anthropic-version: 2023-06-01\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)

    async def head(self) -> tuple[int, dict[str, str]]:
        async with asyncio.timeout(10):
            raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    async def chunk(self) -> bytes:
        """One chunk of a chunked body (b"" at its end)."""
        async with asyncio.timeout(10):
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def body(self, headers: dict[str, str], prefix: bytes = b"") -> bytes:
        if "content-length" in headers:
            async with asyncio.timeout(10):
                return await self.reader.readexactly(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        data = prefix
        while chunk := await self.chunk():
            data += chunk
        return data

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        self.send(method, path, body)
        status, headers = await self.head()
        return status, headers, await self.body(headers)

    async def at_eof(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture(autouse=True)
async def close_connections() -> AsyncIterator[None]:
    yield
    while Conn.opened:
        await Conn.opened.pop().close()


async def start_stream(port: int, name: str, key: str = ACCESS_KEY) -> tuple[Conn, bytes]:
    """A streaming request whose first event has arrived (the upstream now holds it)."""
    conn = await Conn.open(port)
    conn.send("POST", "/v1/messages", message_body(messages=[{"role": "user", "content": name}]), key=key)
    status, headers = await conn.head()
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, headers)
    received = b""
    while len(received) < len(START):
        received += await conn.chunk()
    assert received == START
    return conn, received


async def refused(port: int) -> bool:
    try:
        conn = await Conn.open(port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # it was in the backlog of a listening socket that just closed
        return False
    await conn.close()
    return False


async def ready_until_draining(conn: Conn) -> tuple[int, dict[str, str], bytes]:
    """GET /ready on a keep-alive connection until the drain has begun (a 200 keeps the
    connection open; the drain's 503 closes it)."""
    for _ in range(200):
        status, headers, body = await conn.request("GET", "/ready")
        if status == 503:
            return status, headers, body
        assert status == 200, body
        await asyncio.sleep(0.02)
    raise AssertionError("/ready never said 503")


def assert_shutting_down(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503, body
    assert_anthropic_error(status, body, "overloaded_error")
    assert orjson.loads(body)["error"]["message"] == SHUTTING_DOWN
    assert headers["connection"] == "close" and headers["retry-after"] == "1", headers
    assert headers["x-should-retry"] == "true"


# -- in process -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(upstream_url: str, timeout: float, **settings: Any) -> AsyncIterator[web.AppRunner]:
    """The gateway as ``ccx-proxy serve`` runs it: an AppRunner with the gateway's server and
    a TCP site on 127.0.0.1."""
    app = create_app(make_settings(**settings), make_config(channel("up", upstream_url)))
    app[DRAIN].timeout = timeout
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=drain.GRACE, **server_kwargs(app[GATEWAY].settings)
    )
    await runner.setup()
    assert runner.server is not None
    install(runner.server, app[GATEWAY].settings)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner
    finally:
        await runner.cleanup()


def port_of(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


async def test_drain_finishes_streams_refuses_new_work_and_ends_what_outlives_the_deadline(
    upstream: tuple[FakeUpstream, Gates],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, gates = upstream
    monkeypatch.setattr(drain, "_REPORT", 0.3)
    caplog.set_level(logging.INFO, "ccx_proxy.drain")
    async with served(fake.url, timeout=1.0, data_dir=str(tmp_path)) as runner:
        port = port_of(runner)
        finishing, finishing_got = await start_stream(port, "finishing")
        held, held_got = await start_stream(port, "held")  # its gate never opens
        probe, idle, health = await Conn.open(port), await Conn.open(port), await Conn.open(port)
        for conn in (probe, idle, health):  # each an open keep-alive connection
            status, headers, _ = await conn.request("GET", "/ready")
            assert status == 200 and headers.get("connection") != "close"

        task = asyncio.create_task(drain.drain([runner]))
        status, headers, body = await ready_until_draining(probe)
        assert headers["connection"] == "close" and orjson.loads(body)["draining"] is True
        assert await probe.at_eof()
        assert await refused(port)  # the listening socket is closed
        idle.send("POST", "/v1/messages", message_body())
        status, headers = await idle.head()
        assert_shutting_down(status, headers, await idle.body(headers))
        assert await idle.at_eof()
        status, headers, body = await health.request("GET", "/health")  # liveness: still alive
        assert status == 200 and headers["connection"] == "close"

        gates.open("finishing")
        assert await finishing.body({"transfer-encoding": "chunked"}, finishing_got) == START + DELTA + STOP
        assert not task.done()  # the held stream is still open
        assert await held.body({"transfer-encoding": "chunked"}, held_got) == START + SHUTDOWN_EVENT
        async with asyncio.timeout(drain.GRACE + 1):
            await task
        gateway = runner.app[GATEWAY]
        assert gateway.health.get("up").breaker.consecutive == 0  # not the upstream's fault
        assert runner.app[DRAIN].refused == 1 and not runner.app[DRAIN].streams
    assert "draining: 1 requests still in progress" in caplog.text
    assert "deadline reached: ending 1 open streams" in caplog.text
    assert fake.completed == 1 and fake.aborted == 1


async def test_hurry_a_second_sigint_ends_the_drain_at_once(upstream: tuple[FakeUpstream, Gates]) -> None:
    fake, _ = upstream
    async with served(fake.url, timeout=60.0) as runner:
        held, got = await start_stream(port_of(runner), "held")
        hurry = asyncio.Event()
        task = asyncio.create_task(drain.drain([runner], hurry))
        await asyncio.sleep(0.1)
        assert not task.done()
        hurry.set()
        assert await held.body({"transfer-encoding": "chunked"}, got) == START + SHUTDOWN_EVENT
        async with asyncio.timeout(drain.GRACE + 1):
            await task


def test_a_stream_that_starts_after_the_deadline_ends_at_once() -> None:
    state = drain.Drain(1.0)

    class Upstream:
        closed = 0

        def close(self) -> None:
            self.closed += 1

    early, late = Upstream(), Upstream()
    state.track(early)
    assert state.end_streams() == 1 and early.closed == 1
    state.track(late)
    assert late.closed == 1


async def test_drain_without_a_gateway_app_does_nothing() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        await drain.drain([runner])  # e.g. the mock upstream of --with-mock-upstream
        assert runner.server is not None and not runner.server.connections
    finally:
        await runner.cleanup()


async def test_ready_says_why_not(aiohttp_client: Any, tmp_path: Path) -> None:
    app = create_app(make_settings(data_dir=str(tmp_path)), make_config(channel("up"), channel("two")))
    client = await aiohttp_client(app)
    resp = await client.get("/ready")
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    body = await resp.json()
    assert body["status"] == "ready" and body["draining"] is False and body["data_dir_writable"] is True
    assert body["channels"] == {"active": 2, "available": 2, "total": 2}

    gateway = app[GATEWAY]
    up, two = gateway.runtime.config.channels
    gateway.health.channel(up.name, up.breaker).backoff_until = gateway.health.clock() + 60  # held back
    gateway.health.channel(two.name, two.breaker).key(two.api_keys[0], two.breaker).disabled = True
    gateway.settings = dataclasses.replace(gateway.settings, data_dir=str(tmp_path / "missing"))
    app[DRAIN].draining = True
    resp = await client.get("/ready")
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "not_ready" and body["channels"]["available"] == 0
    assert body["reasons"] == [
        "draining: the gateway is shutting down",
        "the data directory (DATA_DIR) is not writable",
        "no active channel can take requests",
    ]
    health_resp = await client.get("/health")  # liveness is not readiness
    assert health_resp.status == 200


async def test_ready_without_active_channels_or_data_dir(aiohttp_client: Any) -> None:
    config = make_config(channel("off", status="suspended"))
    client = await aiohttp_client(create_app(make_settings(data_dir=None), config))
    resp = await client.get("/ready")
    body = await resp.json()
    assert resp.status == 503 and body["data_dir_writable"] is None
    assert body["reasons"] == ["no active channel is configured"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(None, 120.0, id="default"),
        pytest.param("", 120.0, id="empty"),
        pytest.param("1.5", 1.5, id="fraction"),
        pytest.param("0", 0.0, id="no-wait"),
    ],
)
def test_drain_timeout(raw: str | None, expected: float) -> None:
    assert drain_timeout({} if raw is None else {"DRAIN_TIMEOUT_S": raw}) == expected


@pytest.mark.parametrize("raw", ["soon", "-1", "1e9", "nan"])
def test_drain_timeout_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="DRAIN_TIMEOUT_S must be a number of seconds"):
        drain_timeout({"DRAIN_TIMEOUT_S": raw})


def test_serve_refuses_a_bad_drain_timeout(tmp_path: Path) -> None:
    config = tmp_path / "channels.json"
    config.write_text(json.dumps({"channels": [channel("up")]}))
    result = subprocess.run(
        [sys.executable, "-m", "ccx_proxy", "serve", "--port", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        env=serve_env(tmp_path, DRAIN_TIMEOUT_S="two minutes"),
        timeout=30,
    )
    assert result.returncode == 2 and "DRAIN_TIMEOUT_S must be" in result.stderr


# -- real processes ---------------------------------------------------------------------


def start_serve(
    tmp_path: Path, upstream_url: str, port: int, notify: NotifySocket, *extra: str, **env: str
) -> subprocess.Popen[str]:
    config = tmp_path / "channels.json"
    config.write_text(json.dumps({"channels": [channel("up", upstream_url)]}))
    return subprocess.Popen(
        [sys.executable, "-m", "ccx_proxy", "serve", "--port", str(port), "--config", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=serve_env(tmp_path, NOTIFY_SOCKET=notify.address, **env),
    )


async def finish(proc: subprocess.Popen[str]) -> str:
    try:
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return stderr


@pytest.mark.timeout(40)
async def test_serve_drains_on_sigterm_and_exits_0(
    upstream: tuple[FakeUpstream, Gates], tmp_path: Path
) -> None:
    fake, gates = upstream
    notify = NotifySocket(tmp_path / "notify")
    port = unused_port()
    proc = start_serve(tmp_path, fake.url, port, notify, DRAIN_TIMEOUT_S="1.5")
    try:
        await notify.until("READY=1")
        finishing, finishing_got = await start_stream(port, "finishing", KEY)
        held, held_got = await start_stream(port, "held", KEY)
        probe, idle = await open_keepalive(port), await open_keepalive(port)

        proc.send_signal(signal.SIGTERM)
        await notify.until("STOPPING=1", timeout=10)
        status, headers, body = await ready_until_draining(probe)
        assert orjson.loads(body)["status"] == "not_ready"
        assert await refused(port)
        idle.send("POST", "/v1/messages", message_body(), key=KEY)
        status, headers = await idle.head()
        assert_shutting_down(status, headers, await idle.body(headers))
        assert await idle.at_eof()

        gates.open("finishing")
        assert await finishing.body({"transfer-encoding": "chunked"}, finishing_got) == START + DELTA + STOP
        # Held past DRAIN_TIMEOUT_S: ends with the error event, well-formed.
        assert await held.body({"transfer-encoding": "chunked"}, held_got) == START + SHUTDOWN_EVENT
        stderr = await finish(proc)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "deadline reached: ending 1 open streams" in stderr
    assert "1 requests answered 503" in stderr


@pytest.mark.timeout(40)
async def test_a_second_sigterm_keeps_draining_a_second_sigint_ends_it(
    upstream: tuple[FakeUpstream, Gates], tmp_path: Path
) -> None:
    fake, _ = upstream
    notify = NotifySocket(tmp_path / "notify")
    proc = start_serve(tmp_path, fake.url, port := unused_port(), notify, DRAIN_TIMEOUT_S="30")
    try:
        await notify.until("READY=1")
        held, got = await start_stream(port, "held", KEY)
        proc.send_signal(signal.SIGTERM)
        await notify.until("STOPPING=1", timeout=10)
        proc.send_signal(signal.SIGTERM)  # e.g. systemd and a supervisor both: still draining
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await held.reader.read(1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C again: end it now
        assert await held.body({"transfer-encoding": "chunked"}, got) == START + SHUTDOWN_EVENT
        stderr = await finish(proc)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "SIGTERM again: still draining" in stderr and "drain cut short (SIGINT)" in stderr


@pytest.mark.timeout(60)
async def test_workers_drain_on_the_forwarded_sigterm(
    upstream: tuple[FakeUpstream, Gates], tmp_path: Path
) -> None:
    fake, gates = upstream
    notify = NotifySocket(tmp_path / "notify")
    port = unused_port()
    proc = start_serve(tmp_path, fake.url, port, notify, "--workers", "2", DRAIN_TIMEOUT_S="10")
    try:
        await notify.until("READY=1", timeout=30)
        streams = [await start_stream(port, f"s{i}", KEY) for i in range(4)]  # likely both workers
        proc.send_signal(signal.SIGTERM)
        await notify.until("STOPPING=1", timeout=10)
        for _ in range(200):  # both workers close their listening sockets
            if await refused(port):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("a worker still accepts connections")
        for i in range(4):
            gates.open(f"s{i}")
        for conn, got in streams:
            assert await conn.body({"transfer-encoding": "chunked"}, got) == START + DELTA + STOP
        stderr = await finish(proc)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert stderr.count("draining: no new connections") == 2


async def open_keepalive(port: int) -> Conn:
    conn = await Conn.open(port)
    status, headers, _ = await conn.request("GET", "/health")
    assert status == 200 and headers.get("connection") != "close"
    return conn
