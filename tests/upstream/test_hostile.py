"""Hostile upstreams, over real sockets, through the whole gateway.

Each upstream here is a raw asyncio server on 127.0.0.1 that writes exactly the bytes a
test names.  What the client of the gateway sees is checked exactly: a bad response
head is an Anthropic-shaped 502 ``api_error`` naming the channel, a stream that breaks
ends with the gateway's own SSE ``error`` event and nothing the upstream sent after the
break, timeouts are 504s, and no connection that saw any of it is ever used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from ccx_proxy.state import GATEWAY
from tests.conftest import AUTH, SSE_BODY, assert_anthropic_error, channel, message_body

pytestmark = pytest.mark.timeout(15)

FAST = {"connectTimeoutMs": 1000, "responseHeaderTimeoutMs": 300, "streamInactivityTimeoutMs": 300}
WAIT = 5.0  # the bound on every wait for something the test expects to happen

EVENT_START = b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1"}}\n\n'
EVENT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
)
GOOD_JSON = b'{"type":"message","id":"msg_ok","content":[]}'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse_head(extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + extra + b"\r\n"


GOOD_SSE = _sse_head(b"Content-Length: %d\r\n" % len(SSE_BODY)) + SSE_BODY


# -- a raw upstream --------------------------------------------------------------------


@dataclass
class Exchange:
    """One request as the raw upstream received it, and the socket to answer on."""

    connection: int  # which connection it came on: 1 for the first the upstream accepted
    head: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    received_after: int = 0  # bytes read by until_closed()
    reset: bool = False  # the peer reset the connection (rather than a FIN)

    @property
    def length(self) -> int:
        for line in self.head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        return 0

    async def read_body(self) -> bytes:
        return await self.reader.readexactly(self.length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_closed(self) -> None:
        """Read whatever comes until the gateway closes or resets the connection."""
        try:
            while data := await self.reader.read(65536):
                self.received_after += len(data)
        except ConnectionError:
            self.reset = True
        self.closed.set()


# What the upstream does with one request; True: read the next request on this connection.
Action = Callable[[Exchange], Awaitable[bool]]


class RawUpstream:
    def __init__(self, actions: list[Action], receive_buffer: int | None = None) -> None:
        self.actions = actions  # per request, in order; the last one repeats
        self.receive_buffer = receive_buffer
        self.connections = 0
        self.exchanges: list[Exchange] = []
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> RawUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.receive_buffer is not None:  # inherited by accepted sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                exchange = Exchange(number, head, reader, writer)
                action = self.actions[min(len(self.exchanges), len(self.actions) - 1)]
                self.exchanges.append(exchange)
                if not await action(exchange):
                    return
        except ConnectionError:
            return
        except asyncio.CancelledError:
            # Teardown: end normally (Python 3.11's start_server logs a cancelled handler).
            return
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(*actions: Action, receive_buffer: int | None = None) -> RawUpstream:
        upstream = await RawUpstream(list(actions), receive_buffer).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


# -- actions ---------------------------------------------------------------------------


def answer(data: bytes) -> Action:
    """Read the request body, write ``data``, keep the connection for the next request."""

    async def act(exchange: Exchange) -> bool:
        await exchange.read_body()
        await exchange.send(data)
        return True

    return act


def answer_then_hold(data: bytes) -> Action:
    """Write ``data`` (possibly nothing), then say nothing until the gateway hangs up."""

    async def act(exchange: Exchange) -> bool:
        await exchange.read_body()
        if data:
            await exchange.send(data)
        await exchange.until_closed()
        return False

    return act


async def _post(client: Any, stream: bool = True, **extra: Any) -> tuple[Any, bytes]:
    resp = await client.post("/v1/messages", data=message_body(stream=stream, **extra), headers=AUTH)
    return resp, await resp.read()


async def _bounded(condition: Callable[[], bool], seconds: float = WAIT) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; whether it held."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not condition():
        if loop.time() >= until:
            return False
        await asyncio.sleep(0.01)
    return True


async def _next_request_is_fresh(client: Any, upstream: RawUpstream) -> None:
    """The request after a failure is served, and on a connection of its own."""
    resp, body = await _post(client)
    assert resp.status == 200, body
    assert body == SSE_BODY
    assert upstream.exchanges[-1].connection == upstream.connections == 2
    assert sum(1 for e in upstream.exchanges if e.connection == 1) == 1  # nothing more on the first


def _sse_error(body: bytes, prefix: bytes, channel_name: str) -> str:
    """``body`` is ``prefix`` then exactly one gateway SSE error event; returns its message."""
    assert body.startswith(prefix), body
    rest = body[len(prefix) :]
    assert rest.startswith(b"event: error\ndata: ") and rest.endswith(b"\n\n"), rest
    assert rest.count(b"\n\n") == 1, rest
    data = orjson.loads(rest[len(b"event: error\ndata: ") : -2])
    assert data["type"] == "error" and data["error"]["type"] == "api_error", data
    message = str(data["error"]["message"])
    assert f"upstream channel {channel_name!r}" in message
    assert message.endswith("; the response is incomplete")
    return message


# -- bad response heads ----------------------------------------------------------------

LEAK = b"X-Leak: from-a-bad-head\r\n"
BODY = b"LEAKED-BODY"


@pytest.mark.parametrize(
    "head, reason",
    [
        pytest.param(
            b"HTTP/1.1 999 Weird\r\n" + LEAK + b"Content-Length: 11\r\n\r\n",
            "status 999 is not a valid final response",
            id="status-999",
        ),
        pytest.param(
            b"HTTP/1.1 000 Zero\r\n" + LEAK + b"Content-Length: 11\r\n\r\n",
            "status 0 is not a valid final response",
            id="status-0",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\n"
            + LEAK
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "status 101 is not a valid final response",
            id="101-switching-protocols",
        ),
        pytest.param(
            b"HTTP/1.1 200 O\rK\r\n" + LEAK + b"Content-Length: 11\r\n\r\n",
            "CR",
            id="bare-CR-in-reason",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\n" + LEAK + b"Content-Length: 11\r\n\r\n",
            "whitespace",
            id="obs-fold",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + LEAK + b"Content-Length: 11\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding",
            id="content-length-and-chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + LEAK + b"Content-Length: 11\r\nContent-Length: 4\r\n\r\n",
            "Content-Length",
            id="two-content-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n"
            + LEAK
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(70))
            + b"Content-Length: 11\r\n\r\n",
            "over 64 KB",
            id="head-over-64KB",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + LEAK + b"X-Endless: " + b"e" * (70 * 1024),
            "over 64 KB",
            id="one-header-line-over-64KB-never-ending",
        ),
    ],
)
async def test_a_bad_response_head_is_a_502_naming_the_channel(
    start_gateway, raw_upstream, head: bytes, reason: str
) -> None:
    upstream = await raw_upstream(answer_then_hold(head + BODY), answer(GOOD_SSE))
    client = await start_gateway(channel("hostile", upstream.url, **FAST))
    resp, body = await _post(client)
    assert resp.status == 502
    assert resp.content_type == "application/json"
    message = assert_anthropic_error(resp.status, body, "api_error")
    assert message.startswith("upstream channel 'hostile' sent an invalid HTTP response: "), message
    assert reason.lower() in message.lower(), message
    assert BODY not in body and "X-Leak" not in resp.headers
    # The gateway dropped that connection: the upstream sees it go...
    first = upstream.exchanges[0]
    await asyncio.wait_for(first.closed.wait(), WAIT)
    # ...and the next request on the channel goes on a new one.
    await _next_request_is_fresh(client, upstream)


async def test_a_bad_chunk_mid_stream_ends_it_with_an_error_event_and_nothing_after(
    start_gateway, raw_upstream
) -> None:
    # A valid chunk, then a chunk size that is not hex followed by bytes that would parse
    # as a valid chunk if the parser resynchronised: all in the same write.
    poisoned = _chunk(EVENT_DELTA) + b"zz\r\n7\r\nINJECT!\r\n" + _chunk(b"INJECT!") + b"0\r\n\r\n"

    async def act(exchange: Exchange) -> bool:
        await exchange.read_body()
        await exchange.send(_sse_head(b"Transfer-Encoding: chunked\r\n") + _chunk(EVENT_START))
        await exchange.send(poisoned)
        await exchange.until_closed()
        return False

    upstream = await raw_upstream(act, answer(GOOD_SSE))
    client = await start_gateway(channel("chunky", upstream.url, **FAST))
    resp, body = await _post(client)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    message = _sse_error(body, EVENT_START + EVENT_DELTA, "chunky")
    assert "broke off mid-stream" in message
    assert b"INJECT" not in body
    await asyncio.wait_for(upstream.exchanges[0].closed.wait(), WAIT)
    await _next_request_is_fresh(client, upstream)


async def test_a_stream_that_stalls_after_the_headers_ends_with_an_error_event(
    start_gateway, raw_upstream
) -> None:
    head = _sse_head(b"Transfer-Encoding: chunked\r\n") + _chunk(EVENT_START)
    upstream = await raw_upstream(answer_then_hold(head), answer(GOOD_SSE))
    client = await start_gateway(channel("stall", upstream.url, **FAST, keepaliveMs=0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp, body = await _post(client)
    took = loop.time() - started
    assert resp.status == 200
    message = _sse_error(body, EVENT_START, "stall")
    assert "stalled: no data for 300 ms" in message
    assert 0.25 < took < WAIT  # the inactivity timeout ended it, not something else
    await asyncio.wait_for(upstream.exchanges[0].closed.wait(), WAIT)
    await _next_request_is_fresh(client, upstream)


async def test_response_headers_that_never_come_are_a_504(start_gateway, raw_upstream) -> None:
    upstream = await raw_upstream(answer_then_hold(b""), answer(GOOD_SSE))
    client = await start_gateway(channel("mute", upstream.url, **FAST))
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp, body = await _post(client)  # a stream request: responseHeaderTimeoutMs applies
    assert 0.25 < loop.time() - started < WAIT
    assert resp.status == 504
    message = assert_anthropic_error(resp.status, body, "timeout_error")
    assert message == (
        "upstream channel 'mute' timed out: no response headers from the upstream for 0.3 s; "
        "retry shortly; if it persists, the gateway's operator should check that channel"
    )
    await asyncio.wait_for(upstream.exchanges[0].closed.wait(), WAIT)
    await _next_request_is_fresh(client, upstream)


async def test_an_upstream_that_never_reads_a_large_body_is_dropped_with_it(
    start_gateway, raw_upstream
) -> None:
    go = asyncio.Event()

    async def never_read(exchange: Exchange) -> bool:
        await go.wait()  # not one byte of the body is read until the gateway has given up
        await exchange.until_closed()
        return False

    # A small receive buffer: the upstream's kernel cannot take the body in on its own.
    upstream = await raw_upstream(never_read, answer(GOOD_SSE), receive_buffer=64 * 1024)
    client = await start_gateway(channel("sink", upstream.url, **FAST))
    gateway = client.app[GATEWAY]
    request = message_body(system="x" * (10 * 1024 * 1024))
    resp = await client.post("/v1/messages", data=io.BytesIO(request), headers=AUTH)
    body = await resp.read()
    assert resp.status == 504
    message = assert_anthropic_error(resp.status, body, "timeout_error")
    assert message.startswith("upstream channel 'sink' timed out"), message
    # No upstream socket is left on the gateway's side within a second...
    assert await _bounded(lambda: gateway.client.counts() == (0, 0), 1.0), gateway.client.counts()
    # ...and the upstream sees its connection end, with the unsent rest of the body dropped
    # rather than flushed (what it reads is only what was already in the kernels' buffers).
    go.set()
    first = upstream.exchanges[0]
    await asyncio.wait_for(first.closed.wait(), WAIT)
    assert first.received_after < len(request) // 2, first.received_after
    await _next_request_is_fresh(client, upstream)


async def test_interim_1xx_responses_are_skipped_and_the_200_relayed_exactly(
    start_gateway, raw_upstream
) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </hint.css>; rel=preload\r\nX-Interim: 1\r\n\r\n"
    )
    upstream = await raw_upstream(answer(interim + GOOD_SSE))
    client = await start_gateway(channel("early", upstream.url, **FAST))
    for _ in range(2):
        resp, body = await _post(client)
        assert resp.status == 200
        assert body == SSE_BODY
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "Link" not in resp.headers and "X-Interim" not in resp.headers
    # The interim responses did not upset the framing: the connection was fit to reuse.
    assert [e.connection for e in upstream.exchanges] == [1, 1]


async def test_bytes_after_a_complete_response_are_never_read_as_the_next_one(
    start_gateway, raw_upstream
) -> None:
    smuggled = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n" + b"SMUGGLED!"
    )
    first = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s%s" % (
        len(GOOD_JSON),
        GOOD_JSON,
        smuggled,
    )
    upstream = await raw_upstream(answer(first), answer(GOOD_SSE))
    client = await start_gateway(channel("extra", upstream.url, **FAST))
    resp, body = await _post(client, stream=False)
    assert resp.status == 200
    assert body == GOOD_JSON
    await _next_request_is_fresh(client, upstream)
