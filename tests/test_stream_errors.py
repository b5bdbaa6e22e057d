"""A 200 stream whose first event is an error fails over like a 429/529 would, before the
client sees a byte (GLM reports burst limits as HTTP 200 + `event: error`, codes 1302/1303)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from ccx_proxy.failover import stream_error
from ccx_proxy.upstream.response import HIGH_WATER
from tests.conftest import AUTH, SSE_BODY, FakeClock, Reply, assert_anthropic_error, channel, message_body


def _event(kind: str, **extra: object) -> bytes:
    data = orjson.dumps({"type": "error", "error": {"type": kind, "message": f"{kind} here", **extra}})
    return b"event: error\ndata: " + data + b"\n\n"


OVERLOADED = _event("overloaded_error")
GLM_BURST = _event("api_error", code="1302")
INVALID = _event("invalid_request_error")


@pytest.mark.parametrize(
    "first, expected",
    [
        pytest.param(OVERLOADED, (529, "overloaded_error"), id="overloaded"),
        pytest.param(_event("rate_limit_error"), (429, "rate_limit_error"), id="rate-limit"),
        pytest.param(GLM_BURST, (429, "rate_limit_error"), id="glm-1302-in-200"),
        pytest.param(_event("api_error", code="1303"), (429, "rate_limit_error"), id="glm-1303-in-200"),
        pytest.param(_event("api_error"), (500, "api_error"), id="api-error"),
        pytest.param(b"event:error\r\ndata: not json\r\n\r\n", (500, "api_error"), id="crlf-unreadable"),
        pytest.param(INVALID, None, id="the-requests-own-fault"),
        pytest.param(SSE_BODY, None, id="a-good-stream"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_which_first_events_count_as_a_failed_attempt(first: bytes, expected: tuple[int, str] | None) -> None:
    found = stream_error(first)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        status, body = found
        assert status == expected[0]
        assert_anthropic_error(status, body, expected[1])


@pytest.mark.parametrize("first", [OVERLOADED, GLM_BURST], ids=["overloaded", "glm-1302"])
async def test_an_error_first_fails_over_and_the_client_sees_only_the_second(
    start_gateway, make_upstream, first: bytes
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.reply = Reply(chunks=[first])
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=FakeClock()
    )
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 200 and resp.headers["x-ccx-channel"] == "b"
    assert await resp.read() == SSE_BODY
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_with_nothing_else_the_client_gets_the_error_as_a_status(start_gateway, fake_upstream) -> None:
    fake_upstream.reply = Reply(chunks=[OVERLOADED])
    client = await start_gateway(channel("a", fake_upstream.url), clock=FakeClock())
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    body = await resp.read()
    assert resp.status == 529 and resp.headers["x-ccx-channel"] == "a"
    assert "overloaded_error here" in assert_anthropic_error(529, body, "overloaded_error")


async def test_an_error_about_the_request_streams_as_the_upstream_sent_it(
    start_gateway, fake_upstream
) -> None:
    fake_upstream.reply = Reply(chunks=[INVALID])
    client = await start_gateway(channel("a", fake_upstream.url))
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 200 and await resp.read() == INVALID
    assert len(fake_upstream.requests) == 1


async def test_the_first_event_is_awaited_across_reads_and_then_relayed_exactly(
    start_gateway, fake_upstream
) -> None:
    hold = asyncio.Event()

    async def gate(i: int) -> None:
        if i == 2:
            await hold.wait()

    # The first event split over two writes; the rest held back until the client has it.
    end = SSE_BODY.index(b"\n\n") + 2
    fake_upstream.reply = Reply(chunks=[SSE_BODY[:7], SSE_BODY[7:end], SSE_BODY[end:]], gate=gate)
    client = await start_gateway(channel("a", fake_upstream.url))
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 200
    got = await resp.content.readany()
    hold.set()
    assert got + await resp.read() == SSE_BODY


async def test_a_first_event_longer_than_the_pause_mark_is_not_waited_on(
    start_gateway, fake_upstream
) -> None:
    big = b"event: content_block_delta\ndata: " + b"x" * (2 * HIGH_WATER)  # no blank line yet
    fake_upstream.reply = Reply(chunks=[big, b"\n\n", b"event: message_stop\ndata: {}\n\n"])
    client = await start_gateway(channel("a", fake_upstream.url))
    resp = await asyncio.wait_for(client.post("/v1/messages", data=message_body(), headers=AUTH), 5)
    assert await resp.read() == big + b"\n\nevent: message_stop\ndata: {}\n\n"
