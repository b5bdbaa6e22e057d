"""The upstream HTTP/1.1 client: wire format (h1), header encoding, and the pool, against
raw asyncio servers that send exactly the bytes each test needs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from ccx_proxy.client import ConnectFailed, Disconnected, ReadTimeout, UpstreamClient
from ccx_proxy.h1 import BadResponse, ChunkedDecoder, parse_head, request_head

from .conftest import AUTH, Reply, assert_anthropic_error, channel, message_body

# -- wire format -----------------------------------------------------------------


def _chunked(chunks: list[bytes], trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=60), max_size=8),
    trailers=st.sampled_from([b"", b"x-t: 1\r\n"]),
    extension=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=5),
    after=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]),
)
def test_chunked_decoder_any_split(
    chunks: list[bytes], trailers: bytes, extension: bool, cuts: list[int], after: bytes
) -> None:
    data = _chunked(chunks, trailers)
    if extension and chunks:
        data = data.replace(b"\r\n", b";ext=1\r\n", 1)
    data += after
    decoder = ChunkedDecoder()
    out = b""
    prev = 0
    for cut in sorted({c for c in cuts if c < len(data)}) + [len(data)]:
        out += decoder.feed(data[prev:cut])
        prev = cut
        if decoder.done:
            break
    assert decoder.done
    assert out == b"".join(chunks)
    rest = decoder.rest + data[prev:]
    assert rest == after


def test_chunked_decoder_fast_path_does_not_trust_lookalike_data() -> None:
    # Chunk data containing "\r\n5\r\n" must not be split there.
    chunks = [b"ab\r\n5\r\ncd", b"\r\n0\r\n\r\n"]
    decoder = ChunkedDecoder()
    assert decoder.feed(_chunked(chunks)) == b"".join(chunks) and decoder.done


@pytest.mark.parametrize("bad", [b"zz\r\nab\r\n", b"2\r\nabX\r\n", b"-1\r\n"])
def test_chunked_decoder_rejects_bad_framing(bad: bytes) -> None:
    with pytest.raises(BadResponse):
        ChunkedDecoder().feed(bad)


@pytest.mark.parametrize(
    "head, framing, length, keep_alive",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", "chunked", 0, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12", "length", 12, True),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream", "close", 0, False),
        (b"HTTP/1.1 204 No Content", "none", 0, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1", "length", 1, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1", "length", 1, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5", "chunked", 0, False),
    ],
)
def test_response_framing(head: bytes, framing: str, length: int, keep_alive: bool) -> None:
    parsed = parse_head(head)
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (framing, length, keep_alive)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 200 OK\r\n bad: fold",
        b"HTTP/1.1 200 OK\r\nnocolon",
        "HTTP/1.1 200 OK\r\nContent-Length: \u00b2".encode(),  # isdigit() but not a number
        "HTTP/1.1 2\u00b200 OK".encode(),
        b"HTTP/1.1 200 OK\r\nX-Odd: 1\nSet-Cookie: evil=1",  # a bare LF inside a value
        b"HTTP/1.1 200 OK\r\nX-Odd: a\x00b",
    ],
)
def test_bad_response_heads(head: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_head(head)


def test_request_head_and_header_injection() -> None:
    url = URL("http://[::1]:8080/anthropic/v1/messages?beta=true", encoded=True)
    head = request_head(url, b"x-api-key: k\r\n", 3)
    assert head == (
        b"POST /anthropic/v1/messages?beta=true HTTP/1.1\r\nHost: [::1]:8080\r\n"
        b"x-api-key: k\r\nContent-Length: 3\r\n\r\n"
    )


# -- the client against real sockets --------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[URL]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> URL:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}/v1/messages")

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    c.close()
    await asyncio.sleep(0)


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def _request(client: UpstreamClient, url: URL, timeout: float = 5.0) -> object:
    return await client.request(
        url, b"{}", b"x-api-key: k\r\n", connect_timeout=timeout, read_timeout=timeout
    )


async def test_keep_alive_reuses_one_connection_and_sends_exact_bytes(serve, client) -> None:
    connections = 0
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                seen.append(await _read_request(reader))
                writer.write(
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                )
        except asyncio.IncompleteReadError:
            writer.close()

    url = await serve(handler)
    for _ in range(3):
        response = await _request(client, url)
        assert response.status == 200 and await response.read() == b"hello"
        response.release()
    assert connections == 1
    assert seen[0] == f"POST /v1/messages HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n".encode() + (
        b"x-api-key: k\r\nContent-Length: 2\r\n\r\n{}"
    )


async def test_a_response_not_read_to_the_end_is_never_reused(serve, client) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await _read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    url = await serve(handler)
    for _ in range(2):
        response = await _request(client, url)
        assert await response.readany() == b"abc"
        response.release()  # body incomplete: closed, not pooled
    assert connections == 2


async def test_read_timeout_and_body_until_close(serve, client) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()  # say nothing until the client gives up and closes
        writer.close()

    url = await serve(silent)
    with pytest.raises(ReadTimeout):
        await client.request(url, b"{}", b"", connect_timeout=1, read_timeout=0.1)

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await writer.drain()
        writer.close()

    url = await serve(until_close)
    response = await _request(client, url)
    assert response.content_type == "text/event-stream"
    assert await response.read() == b"data: 1\n\n" and response.at_eof


async def test_cut_mid_body_and_refused_connections_raise_client_errors(serve, client) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    url = await serve(cut)
    response = await _request(client, url)
    assert await response.readany() == b"partial"
    with pytest.raises(Disconnected):
        await response.readany()
    response.close()

    with pytest.raises(ConnectFailed, match="cannot connect to 127.0.0.1:1"):
        await _request(client, URL("http://127.0.0.1:1/v1/messages"))


async def test_deadline_bounds_the_wait_for_the_head(serve, client) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await reader.read()
        writer.close()

    url = await serve(silent)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ReadTimeout, match="deadline"):
        await client.request(url, b"{}", b"", connect_timeout=5, read_timeout=5, deadline=started + 0.15)
    assert 0.1 < loop.time() - started < 2


async def test_gateway_failover_deadline_is_a_504(start_gateway, fake_upstream) -> None:
    fake_upstream.reply = Reply(before=1.0)  # headers come too late
    gateway = await start_gateway(
        channel("slow", fake_upstream.url), failoverDeadlineMs=200, responseHeaderTimeoutMs=5000
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await gateway.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 504
    message = assert_anthropic_error(resp.status, await resp.read(), "timeout_error")
    assert "failover deadline reached" in message
    assert loop.time() - started < 0.9


async def test_idle_connections_expire(serve) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert await reader.read() == b""  # the client closed the idle connection
        closed.set()
        writer.close()

    client = UpstreamClient(keepalive_timeout=0.15)
    try:
        url = await serve(handler)
        response = await _request(client, url)
        assert await response.read() == b"ok"
        response.release()
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        client.close()


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(serve, client) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        try:
            await _read_request(reader)  # a second request on this connection...
        except asyncio.IncompleteReadError:
            pass
        writer.close()  # ...is dropped unanswered, as an upstream closing an idle connection does

    url = await serve(handler)
    for _ in range(2):
        response = await _request(client, url)
        assert response.status == 200 and await response.read() == b"ok"
        response.release()
    assert connections == 2


async def test_a_fresh_connection_closed_unanswered_is_an_error(serve, client) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    url = await serve(handler)
    with pytest.raises(Disconnected, match="before responding"):
        await _request(client, url)


async def test_https_upstreams_verify_the_certificate(aiohttp_server) -> None:
    import ssl

    import trustme
    from aiohttp import web

    from ccx_proxy.client import ConnectFailed

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=b"secure " + await request.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", handle)
    server = await aiohttp_server(app, ssl=server_ctx, host="localhost")
    url = URL(f"https://localhost:{server.port}/v1/messages")

    trusting_ctx = ssl.create_default_context()
    ca.configure_trust(trusting_ctx)
    trusting = UpstreamClient(ssl_context=trusting_ctx)
    try:
        for _ in range(2):  # the second one reuses the TLS connection
            response = await _request(trusting, url)
            assert response.status == 200 and await response.read() == b"secure {}"
            response.release()
        assert trusting.counts() == (1, 1)
    finally:
        trusting.close()

    default = UpstreamClient()  # the system trust store does not know this CA
    try:
        with pytest.raises(ConnectFailed, match=r"localhost:\d+ .*(?i:certificate verify failed)"):
            await _request(default, url)
    finally:
        default.close()


async def test_a_malformed_head_on_a_pooled_connection_is_not_sent_again(serve, client) -> None:
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        try:
            while True:
                await _read_request(reader)
                requests += 1
                length = b"2" if requests == 1 else "\u00b2".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    url = await serve(handler)
    first = await _request(client, url)
    assert await first.read() == b"ok"
    first.release()
    with pytest.raises(BadResponse):
        await _request(client, url)  # answered, badly: a bad response, not a stale connection
    assert requests == 2
