"""The client side under hostile traffic (ccx_proxy.server and the relay's client limits):
timeouts, no draining or decompressing of unwanted bodies, aiohttp's own errors as
Anthropic JSON, quiet logs, the concurrency cap, HTTP/1.0 streams.  Raw sockets against
a gateway on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from typing import Any

import orjson
import pytest

from ccx_proxy.auth import AccessKeys
from ccx_proxy.errors import AuthenticationFailed
from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    SSE_BODY,
    Reply,
    assert_anthropic_error,
    channel,
    make_settings,
    message_body,
)

LIMITS = {
    "client_header_timeout": 0.4,
    "client_body_timeout": 0.4,
    "client_keepalive_timeout": 5.0,
    "client_write_timeout": 0.5,
}

FIRST_EVENT = SSE_BODY.index(b"\n\n") + 2  # the gateway waits for the first whole event


@pytest.fixture
async def gw(start_gateway, fake_upstream) -> Any:
    return await start_gateway(channel("a", fake_upstream.url), settings=make_settings(**LIMITS))


async def _open(client: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(client.host, client.port)


async def _response(reader: asyncio.StreamReader, within: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response read off a raw socket: status, headers (lower-case), body."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def _closed(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the gateway closes the connection (fails past ``within``)."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


def _post_head(length: int, extra: str = "", key: str = ACCESS_KEY) -> bytes:
    return (
        f"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


# -- unauthenticated and unwanted bodies cost O(1) ---------------------------------------


def test_every_refusal_is_a_fresh_exception_with_a_short_traceback() -> None:
    keys = AccessKeys(["right-key-123456"])
    seen = []
    for _ in range(3):
        try:
            keys.check({"x-api-key": "wrong"})
        except AuthenticationFailed as exc:
            seen.append(exc)
    assert len({id(e) for e in seen}) == 3  # never the same object raised again
    depths = []
    for exc in seen:
        depth, tb = 0, exc.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        depths.append(depth)
    assert depths[0] == depths[1] == depths[2] <= 2


async def test_a_refused_request_is_closed_not_drained(gw, fake_upstream) -> None:
    reader, writer = await _open(gw)
    writer.write(_post_head(50 * 1024 * 1024, key="wrong-key") + b"x" * 65536)  # 64 KB of 50 MB
    status, headers, body = await _response(reader)
    assert status == 401 and headers["x-should-retry"] == "false"
    assert_anthropic_error(401, body, "authentication_error")
    assert await _closed(reader, 2.0) < 2.0  # not kept open to read 50 MB
    writer.close()
    assert fake_upstream.requests == []


async def test_a_compressed_body_is_refused_unread_with_415(gw, fake_upstream) -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MB of zeros in ~64 KB
    reader, writer = await _open(gw)
    writer.write(_post_head(len(bomb), "Content-Encoding: gzip\r\n") + bomb)
    status, headers, body = await _response(reader)
    message = assert_anthropic_error(415, body, "invalid_request_error")
    assert status == 415 and headers["x-should-retry"] == "false" and "must not be compressed" in message
    writer.close()
    health = await gw.get("/health")
    assert health.status == 200
    assert fake_upstream.requests == []


# -- timeouts -------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_head_timeout(gw) -> None:
    reader, writer = await _open(gw)
    took = await _closed(reader, 3.0)
    writer.close()
    assert 0.3 <= took < 3.0


async def test_a_trickled_head_is_closed_after_the_head_timeout(gw) -> None:
    reader, writer = await _open(gw)
    head = _post_head(10)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # 20 bytes/s: the head would take seconds

    task = asyncio.ensure_future(trickle())
    took = await _closed(reader, 3.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    writer.close()
    assert took < 2.0 and time.monotonic() - started >= 0.35


async def test_a_stalled_body_gets_408(gw, fake_upstream) -> None:
    reader, writer = await _open(gw)
    writer.write(_post_head(1000) + b'{"model":')  # then nothing
    status, _, body = await _response(reader, within=3.0)
    assert status == 408
    assert "stopped arriving" in assert_anthropic_error(408, body, "invalid_request_error")
    writer.close()
    assert fake_upstream.requests == []


async def test_an_idle_keep_alive_connection_is_reused_within_its_timeout(gw, fake_upstream) -> None:
    answer = b'{"type":"message"}'
    fake_upstream.reply = Reply(
        headers={"Content-Type": "application/json", "Content-Length": str(len(answer))}, chunks=[answer]
    )
    reader, writer = await _open(gw)
    body = message_body(stream=False)
    for _ in range(2):  # the head timer is re-armed per request, not per connection
        writer.write(_post_head(len(body)) + body)
        status, _, got = await _response(reader)
        assert status == 200 and got == answer
        await asyncio.sleep(0.5)  # longer than the head timeout, shorter than keep-alive
    writer.close()


async def test_a_client_that_stops_reading_loses_its_stream(start_gateway, fake_upstream) -> None:
    chunk = b"event: content_block_delta\ndata: " + b"x" * 16_000 + b"\n\n"
    fake_upstream.reply = Reply(chunks=[chunk] * 4000)  # 64 MB: far more than socket buffers
    client = await start_gateway(channel("a", fake_upstream.url), settings=make_settings(**LIMITS))
    reader, writer = await _open(client)
    body = message_body()
    writer.write(_post_head(len(body)) + body)
    await reader.read(1024)  # the stream started; now read nothing more
    async with asyncio.timeout(10):
        while fake_upstream.aborted == 0:  # the upstream is aborted once the write stalls
            await asyncio.sleep(0.05)
    assert fake_upstream.aborted == 1 and fake_upstream.completed == 0
    assert fake_upstream.sent < 32 * 1024 * 1024
    writer.close()


# -- protocol edges: aiohttp's own errors, HTTP/2, HTTP/1.0 -------------------------------


@pytest.mark.parametrize(
    "raw, status",
    [
        pytest.param(
            f"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: {'a' * 9000}\r\n\r\n".encode(),
            431,
            id="header-too-large",
        ),
        pytest.param(b"GET /health HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n", 400, id="malformed-header"),
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="bad-request-line"),
    ],
)
async def test_aiohttps_own_errors_are_anthropic_json(gw, caplog, raw: bytes, status: int) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await _open(gw)
    writer.write(raw)
    got, headers, body = await _response(reader)
    assert got == status and headers["content-type"].startswith("application/json")
    assert_anthropic_error(status, body, "invalid_request_error")
    writer.close()
    assert "Traceback" not in caplog.text
    assert sum("bad request from" in r.getMessage() for r in caplog.records) == 1


async def test_a_malformed_header_carrying_the_key_is_not_quoted(gw, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await _open(gw)
    writer.write(f"GET /health HTTP/1.1\r\nHost: gw\r\nx-api-key {ACCESS_KEY}\r\n\r\n".encode())
    _, _, body = await _response(reader)
    writer.close()
    assert ACCESS_KEY.encode() not in body
    assert ACCESS_KEY not in caplog.text


async def test_an_http2_preface_is_closed_cleanly_with_one_log_line(gw, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await _open(gw)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    async with asyncio.timeout(3):
        assert await reader.read() == b""  # closed, no HTTP/1.1 answer
    writer.close()
    assert "Traceback" not in caplog.text
    assert sum("HTTP/2 is not served" in r.getMessage() for r in caplog.records) == 1


async def test_an_http10_stream_ends_with_the_connection(gw) -> None:
    reader, writer = await _open(gw)
    body = message_body()
    head = _post_head(len(body), "Connection: keep-alive\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    writer.write(head + body)
    async with asyncio.timeout(5):
        data = await reader.read(-1)  # to EOF: it must come
    writer.close()
    assert data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    assert data.endswith(SSE_BODY)


# -- the concurrency cap ----------------------------------------------------------------


async def test_the_concurrent_stream_cap_answers_529_with_retry_after(start_gateway, fake_upstream) -> None:
    hold = asyncio.Event()

    async def gate(i: int) -> None:
        await hold.wait()

    fake_upstream.reply = Reply(chunks=[SSE_BODY[:FIRST_EVENT], SSE_BODY[FIRST_EVENT:]], gate=gate)
    client = await start_gateway(channel("a", fake_upstream.url), maxConcurrentStreams=1)
    first = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert first.status == 200 and await first.content.readany()
    second = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    body = await second.read()
    assert second.status == 529 and second.headers["Retry-After"] == "1"
    assert "maxConcurrentStreams" in assert_anthropic_error(529, body, "overloaded_error")
    hold.set()
    assert (await first.read()).endswith(SSE_BODY[FIRST_EVENT:])
    third = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert third.status == 200 and await third.read() == SSE_BODY
    assert orjson.loads(body)["type"] == "error"


def test_a_flood_of_bad_clients_logs_a_bounded_number_of_lines(caplog) -> None:
    from ccx_proxy.server import QuietLog

    caplog.set_level(logging.INFO, logger="ccx_proxy.server")
    quiet = QuietLog(burst=5, window=10.0)
    for i in range(1000):
        quiet.info(100.0 + i * 0.001, "bad request from %s", "1.2.3.4:5")
    assert len(caplog.records) == 5
    quiet.info(111.0, "bad request from %s", "1.2.3.4:5")  # the next window: a summary, then the line
    messages = [r.getMessage() for r in caplog.records[5:]]
    assert messages == [
        "... and 995 more such lines in the last 10 s (not shown)",
        "bad request from 1.2.3.4:5",
    ]
