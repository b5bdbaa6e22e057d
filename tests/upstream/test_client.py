"""UpstreamClient over real sockets on 127.0.0.1: pooling and reuse, what is never
pooled, stale connections, timeouts, TLS, against raw asyncio servers that send exactly
the bytes each test needs.  The parser itself is covered byte by byte in
test_response.py, request heads in test_wire.py."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trustme

from ccx_proxy.upstream.client import UpstreamClient
from ccx_proxy.upstream.errors import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    DeadlineReached,
    Disconnected,
    NothingReceived,
    ReadTimeout,
)
from ccx_proxy.upstream.response import Response
from ccx_proxy.upstream.wire import Endpoint, endpoints
from tests.conftest import AUTH, Reply, assert_anthropic_error, channel, message_body, unused_port

try:
    import uvloop
except ImportError:  # pragma: no cover - not on Windows
    uvloop = None

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEADERS = b"x-api-key: k\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Upstream:
    endpoint: Endpoint
    port: int
    connections: int = 0


Serve = Callable[..., Awaitable[Upstream]]


class Servers:
    """Raw asyncio servers on 127.0.0.1, each running ``handler`` per connection."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []

    async def start(
        self, handler: Handler, *, tls: ssl.SSLContext | None = None, verify: bool = True
    ) -> Upstream:
        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream.connections += 1
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client went away: what several tests want
            finally:
                writer.close()

        server = await asyncio.start_server(counted, "127.0.0.1", 0, ssl=tls)
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        scheme = "https" if tls is not None else "http"
        upstream = Upstream(endpoints(f"{scheme}://127.0.0.1:{port}", verify=verify).messages, port)
        return upstream

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers = Servers()
    yield servers.start
    await servers.aclose()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    c.close()
    await eventually(lambda: c.counts() == (0, 0))


async def eventually(check: Callable[[], object], within: float = 2.0) -> None:
    """Wait (polling, bounded) until check() is true."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not check():
        assert loop.time() < end, "not within the time allowed"
        await asyncio.sleep(0.005)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def post(
    client: UpstreamClient,
    endpoint: Endpoint,
    body: bytes = b"{}",
    *,
    query: bytes = b"",
    timeout: float = 5.0,
    **kwargs: Any,
) -> Response:
    return await client.request(
        endpoint, body, HEADERS, query=query, connect_timeout=timeout, read_timeout=timeout, **kwargs
    )


def answer_every_request(response: bytes, requests: list[bytes] | None = None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if requests is not None:
                requests.append(request)
            writer.write(response)

    return handler


async def drain_outcome(reader: asyncio.StreamReader, within: float = 1.0) -> str:
    """Read whatever is left until the peer goes: "eof" (FIN), "reset" (RST), or "open"."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(1 << 20):
                pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "eof"


# -- pooling and reuse -----------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection_and_sends_exact_bytes(serve: Serve, client) -> None:
    seen: list[bytes] = []
    interim_then_final = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    upstream = await serve(answer_every_request(interim_then_final, seen))
    for query in (b"", b"?beta=true", b""):
        response = await post(client, upstream.endpoint, query=query)
        assert client.counts() == (1, 0)  # in use
        assert (response.status, await response.read()) == (200, b"hello")
        response.release()
        assert client.counts() == (1, 1)  # idle in the pool
    assert upstream.connections == 1
    host = b"Host: 127.0.0.1:%d\r\n" % upstream.port
    tail = b" HTTP/1.1\r\n" + host + b"x-api-key: k\r\nContent-Length: 2\r\n\r\n{}"
    assert seen == [
        b"POST /v1/messages" + tail,
        b"POST /v1/messages?beta=true" + tail,
        b"POST /v1/messages" + tail,
    ]


async def test_a_large_body_goes_out_whole(serve: Serve, client) -> None:
    seen: list[bytes] = []
    upstream = await serve(answer_every_request(OK, seen))
    body = bytes(range(256)) * 4000  # over the size where head and body are written apart
    response = await post(client, upstream.endpoint, body)
    assert await response.read() == b"ok"
    response.release()
    assert len(seen) == 1
    head, _, sent = seen[0].partition(b"\r\n\r\n")
    assert head.endswith(b"\r\nContent-Length: %d" % len(body))
    assert sent == body
    assert client.counts() == (1, 1)


async def test_a_response_not_read_to_the_end_is_never_reused(serve: Serve, client) -> None:
    upstream = await serve(
        answer_every_request(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    )
    for n in (1, 2):
        response = await post(client, upstream.endpoint)
        assert await response.readany() == b"abc"
        response.release()  # body incomplete: aborted, not pooled
        assert client.counts()[1] == 0
        await eventually(lambda: client.counts() == (0, 0))
        assert upstream.connections == n


async def test_a_connection_close_response_is_not_pooled(serve: Serve, client) -> None:
    upstream = await serve(
        answer_every_request(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    )
    for n in (1, 2):
        response = await post(client, upstream.endpoint)
        assert await response.read() == b"ok"
        assert not response.reusable
        response.release()
        assert client.counts()[1] == 0
        await eventually(lambda: client.counts() == (0, 0))
        assert upstream.connections == n


async def test_a_101_answer_is_never_pooled(serve: Serve, client) -> None:
    upstream = await serve(
        answer_every_request(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
    )
    for n in (1, 2):
        with pytest.raises(BadResponse, match="101"):
            await post(client, upstream.endpoint)
        await eventually(lambda: client.counts() == (0, 0))
        assert upstream.connections == n


async def test_bytes_on_an_idle_pooled_connection_drop_it(serve: Serve, client) -> None:
    released = asyncio.Event()
    outcomes: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await released.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")  # unasked for
        outcomes.append(await drain_outcome(reader, within=5.0))  # keeps the connection open

    upstream = await serve(handler)
    response = await post(client, upstream.endpoint)
    assert await response.read() == b"ok"
    response.release()
    assert client.counts() == (1, 1)
    released.set()
    await eventually(lambda: client.counts() == (0, 0))
    await eventually(lambda: outcomes)
    assert (outcomes, upstream.connections) == (["reset"], 1)


async def test_an_idle_connection_closed_by_the_upstream_leaves_the_pool(serve: Serve, client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()

    upstream = await serve(handler)  # the wrapper closes the connection when the handler returns
    response = await post(client, upstream.endpoint)
    assert await response.read() == b"ok"
    response.release()
    await eventually(lambda: client.counts() == (0, 0))
    response = await post(client, upstream.endpoint)  # a fresh one, no error
    assert await response.read() == b"ok"
    response.release()
    assert upstream.connections == 2


async def test_idle_connections_expire(serve: Serve) -> None:
    outcomes: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        outcomes.append(await drain_outcome(reader, within=5.0))

    client = UpstreamClient(keepalive_timeout=0.15)
    try:
        upstream = await serve(handler)
        response = await post(client, upstream.endpoint)
        assert await response.read() == b"ok"
        response.release()
        assert client.counts() == (1, 1)
        await eventually(lambda: outcomes)
        assert outcomes == ["eof"]  # the sweep closed the idle connection, politely
        await eventually(lambda: client.counts() == (0, 0))
    finally:
        client.close()


# -- an unsent body: on asyncio's loop and on uvloop (the gateway's), plain and TLS ------------

LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(
        getattr(uvloop, "new_event_loop", None),
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
    ),
]
Scenario = Callable[[Serve, UpstreamClient], Awaitable[None]]


def run_on(
    new_loop: Callable[[], asyncio.AbstractEventLoop], scenario: Scenario, **client_kwargs: Any
) -> None:
    """Run ``scenario`` with a client and servers on an event loop of its own."""

    async def main() -> None:
        servers = Servers()
        client = UpstreamClient(**client_kwargs)
        try:
            await scenario(servers.start, client)
        finally:
            client.close()
            await servers.aclose()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.mark.parametrize("tls", [pytest.param(False, id="http"), pytest.param(True, id="https")])
@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_body_not_fully_written_is_not_pooled(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
    tls: bool,
    tls_server: ssl.SSLContext,
    trusting: ssl.SSLContext,
) -> None:
    async def scenario(serve: Serve, client: UpstreamClient) -> None:
        released = asyncio.Event()
        outcomes: list[str] = []

        async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(reader)  # answers at once, without reading the body
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno")
            await writer.drain()
            await released.wait()
            outcomes.append(await drain_outcome(reader))

        upstream = await serve(early, tls=tls_server if tls else None)
        body = b"x" * (32 << 20)  # far more than the kernel buffers on both sides hold
        response = await post(client, upstream.endpoint, body)
        assert (response.status, await response.read()) == (413, b"no")
        assert response.reusable  # complete and keep-alive: only the unsent body forbids reuse
        response.release()
        assert client.counts()[1] == 0  # not idle in the pool, not even for a moment
        released.set()
        await eventually(lambda: client.counts() == (0, 0))
        await eventually(lambda: outcomes)
        assert (outcomes, upstream.connections) == (["reset"], 1)

    run_on(new_loop, scenario, ssl_context=trusting)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_an_upstream_that_never_reads_nor_answers(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario(serve: Serve, client: UpstreamClient) -> None:
        got_head = asyncio.Event()
        timed_out = asyncio.Event()
        outcomes: list[str] = []

        async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(reader)
            got_head.set()
            await timed_out.wait()  # neither reads the body nor answers
            outcomes.append(await drain_outcome(reader, within=1.0))

        upstream = await serve(stuck)
        with pytest.raises(ReadTimeout, match="no response headers") as caught:
            await client.request(
                upstream.endpoint, b"x" * 10_000_000, HEADERS, connect_timeout=5, read_timeout=0.2
            )
        assert not isinstance(caught.value, DeadlineReached)
        assert got_head.is_set()
        await eventually(lambda: client.counts() == (0, 0), within=1.0)
        timed_out.set()
        await eventually(lambda: outcomes, within=2.0)
        assert outcomes == ["reset"]  # the socket is gone at once, its unsent megabytes with it

    run_on(new_loop, scenario)


@pytest.mark.parametrize("new_loop", LOOPS)
def test_closing_the_client_mid_body_is_not_a_clean_end(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # A body delimited by the close: our own abort must not read as the upstream's end.
    async def scenario(serve: Serve, client: UpstreamClient) -> None:
        async def streaming(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
            await writer.drain()
            await reader.read()

        upstream = await serve(streaming)
        response = await post(client, upstream.endpoint)
        assert await response.readany() == b"data: 1\n\n"
        client.close()
        with pytest.raises(Disconnected):
            await response.readany()
        assert not response.at_eof

    run_on(new_loop, scenario)


# -- stale connections and failures -----------------------------------------------------------


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(serve: Serve, client) -> None:
    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # a second request on this connection is dropped unanswered,
        # as by an upstream that closed the idle connection while it crossed our request

    upstream = await serve(one_answer_per_connection)
    for _ in range(2):
        response = await post(client, upstream.endpoint)
        assert (response.status, await response.read()) == (200, b"ok")
        response.release()
    assert upstream.connections == 2
    assert client.counts() == (1, 1)


async def test_the_retry_on_a_fresh_connection_is_not_retried_again(serve: Serve, client) -> None:
    async def only_the_first_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if upstream.connections == 1:
            writer.write(OK)
            await writer.drain()
            await read_request(reader)

    upstream = await serve(only_the_first_answer)
    response = await post(client, upstream.endpoint)
    assert await response.read() == b"ok"
    response.release()
    with pytest.raises(NothingReceived):
        await post(client, upstream.endpoint)
    assert upstream.connections == 2
    await eventually(lambda: client.counts() == (0, 0))


async def test_a_fresh_connection_closed_unanswered_is_an_error(serve: Serve, client) -> None:
    async def read_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    upstream = await serve(read_then_close)
    with pytest.raises(NothingReceived, match="before responding"):
        await post(client, upstream.endpoint)
    assert upstream.connections == 1
    await eventually(lambda: client.counts() == (0, 0))


async def test_a_malformed_head_on_a_pooled_connection_is_not_sent_again(serve: Serve, client) -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            requests.append(await read_request(reader))
            length = b"2" if len(requests) == 1 else "\u00b2".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nok")

    upstream = await serve(handler)
    first = await post(client, upstream.endpoint)
    assert await first.read() == b"ok"
    first.release()
    with pytest.raises(BadResponse):
        await post(client, upstream.endpoint)  # answered, badly: not a stale connection
    assert (len(requests), upstream.connections) == (2, 1)
    await eventually(lambda: client.counts() == (0, 0))


async def test_cut_mid_body_is_disconnected(serve: Serve, client) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    upstream = await serve(cut)
    response = await post(client, upstream.endpoint)
    assert await response.readany() == b"partial"
    with pytest.raises(Disconnected, match="before the body was complete"):
        await response.readany()
    response.close()
    await eventually(lambda: client.counts() == (0, 0))


async def test_a_body_until_close_ends_cleanly_and_is_not_pooled(serve: Serve, client) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await writer.drain()

    upstream = await serve(until_close)
    response = await post(client, upstream.endpoint)
    assert response.content_type == "text/event-stream"
    assert await response.read() == b"data: 1\n\n"
    assert response.at_eof and not response.reusable
    response.release()
    await eventually(lambda: client.counts() == (0, 0))


async def test_a_refused_connection_is_connect_failed(client) -> None:
    port = unused_port()
    endpoint = endpoints(f"http://127.0.0.1:{port}").messages
    with pytest.raises(ConnectFailed, match=f"cannot connect to 127.0.0.1:{port} "):
        await post(client, endpoint)
    assert client.counts() == (0, 0)


async def test_a_connect_that_hangs_is_a_connect_timeout(client) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepts: one queued connection fills the backlog...
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            endpoint = endpoints(f"http://127.0.0.1:{port}").messages
            with pytest.raises(ConnectTimeout, match=f"127.0.0.1:{port} timed out after 0.1 s"):
                await client.request(endpoint, b"{}", HEADERS, connect_timeout=0.1, read_timeout=5)
    assert client.counts() == (0, 0)


# -- timeouts and the failover deadline -------------------------------------------------------


async def test_no_head_within_the_read_timeout(serve: Serve, client) -> None:
    requests: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        await reader.read()  # says nothing until the client gives up

    upstream = await serve(silent)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReadTimeout, match="no response headers from the upstream for 0.1 s") as caught:
        await client.request(upstream.endpoint, b"{}", HEADERS, connect_timeout=5, read_timeout=0.1)
    assert type(caught.value) is ReadTimeout
    assert loop.time() >= started + 0.1
    assert (len(requests), upstream.connections) == (1, 1)
    await eventually(lambda: client.counts() == (0, 0))


async def test_the_deadline_bounds_the_wait_for_the_head(serve: Serve, client) -> None:
    requests: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        await reader.read()

    upstream = await serve(silent)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.15
    with pytest.raises(DeadlineReached, match="failover deadline passed before the response head"):
        await client.request(
            upstream.endpoint, b"{}", HEADERS, connect_timeout=30, read_timeout=30, deadline=deadline
        )
    assert loop.time() >= deadline  # not before it; and the 30 s timeouts did not fire
    assert (len(requests), upstream.connections) == (1, 1)  # sent once, not retried
    await eventually(lambda: client.counts() == (0, 0))


async def test_gateway_failover_deadline_is_a_504(start_gateway, fake_upstream) -> None:
    fake_upstream.reply = Reply(before=1.0)  # headers come too late
    gateway = await start_gateway(
        channel("slow", fake_upstream.url), failoverDeadlineMs=200, responseHeaderTimeoutMs=5000
    )
    resp = await gateway.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 504
    message = assert_anthropic_error(resp.status, await resp.read(), "timeout_error")
    assert "failover deadline reached" in message
    # One attempt, and the answer came while the upstream was still holding its headers back.
    assert (len(fake_upstream.requests), fake_upstream.completed) == (1, 0)


# -- TLS --------------------------------------------------------------------------------------


async def test_https_with_a_trusting_context_works_and_reuses_the_connection(
    serve: Serve, tls_server: ssl.SSLContext, trusting: ssl.SSLContext
) -> None:
    upstream = await serve(
        answer_every_request(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure"), tls=tls_server
    )
    client = UpstreamClient(ssl_context=trusting)
    try:
        for _ in range(2):  # the second one reuses the TLS connection
            response = await post(client, upstream.endpoint)
            assert (response.status, await response.read()) == (200, b"secure")
            response.release()
        assert client.counts() == (1, 1)
        assert upstream.connections == 1
    finally:
        client.close()


async def test_https_with_the_default_context_refuses_an_unknown_ca(
    serve: Serve, tls_server: ssl.SSLContext, client
) -> None:
    upstream = await serve(answer_every_request(OK), tls=tls_server)
    with pytest.raises(ConnectFailed, match=r"127\.0\.0\.1:\d+ .*(?i:certificate verify failed)"):
        await post(client, upstream.endpoint)  # the system trust store does not know this CA
    assert client.counts() == (0, 0)


async def test_https_without_verification_accepts_an_unknown_ca(
    serve: Serve, tls_server: ssl.SSLContext, client
) -> None:
    upstream = await serve(answer_every_request(OK), tls=tls_server, verify=False)  # insecureSkipVerify
    response = await post(client, upstream.endpoint)
    assert await response.read() == b"ok"
    response.release()
    assert client.counts() == (1, 1)
