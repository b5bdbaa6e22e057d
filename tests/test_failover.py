"""The fault matrix: what the client sees, which channel/key served, nothing leaked."""

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from ccx_proxy.state import GATEWAY
from ccx_proxy.stream import KEEPALIVE
from tests.conftest import (
    AUTH,
    SSE_BODY,
    UPSTREAM_KEY,
    FakeClock,
    Reply,
    assert_anthropic_error,
    channel,
    message_body,
    unused_port,
)

ERROR_JSON = {"Content-Type": "application/json"}
FAST = {"connectTimeoutMs": 1000, "responseHeaderTimeoutMs": 300, "streamInactivityTimeoutMs": 300}


def _error(status: int, **headers: str) -> Reply:
    body = orjson.dumps(
        {"type": "error", "error": {"type": "upstream_error", "message": f"upstream says {status}"}}
    )
    return Reply(status=status, headers={**ERROR_JSON, **headers}, chunks=[body])


@pytest.fixture
async def pair(make_upstream: Any) -> tuple[Any, Any]:
    return await make_upstream(), await make_upstream()


async def _post(
    client: Any, headers: dict[str, str] | None = None, model: str = "claude-sonnet-4-6", **extra: Any
):
    resp = await client.post(
        "/v1/messages", data=message_body(model, **extra), headers={**AUTH, **(headers or {})}
    )
    return resp, await resp.read()


def _no_secret(body: bytes, resp: Any) -> None:
    assert UPSTREAM_KEY.encode() not in body
    assert all(UPSTREAM_KEY not in v for v in resp.headers.values())


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(_error(429, **{"retry-after": "30"}), id="429-retry-after"),
        pytest.param(_error(500), id="500"),
        pytest.param(_error(502), id="502"),
        pytest.param(_error(503), id="503"),
        pytest.param(_error(504), id="504"),
        pytest.param(_error(529), id="529"),
        pytest.param(Reply(before=5), id="hang-before-headers"),
    ],
)
async def test_failover_to_the_next_channel(start_gateway, pair, reply: Reply) -> None:
    a, b = pair
    a.reply = reply
    client = await start_gateway(channel("a", a.url, priority=1), channel("b", b.url, priority=2), **FAST)
    resp, body = await _post(client)
    assert resp.status == 200
    assert body == SSE_BODY
    assert resp.headers["x-ccx-channel"] == "b"
    assert len(a.requests) == 1 and len(b.requests) == 1
    _no_secret(body, resp)


async def test_connection_refused_fails_over(start_gateway, fake_upstream) -> None:
    client = await start_gateway(
        channel("dead", f"http://127.0.0.1:{unused_port()}", priority=1),
        channel("b", fake_upstream.url, priority=2),
    )
    resp, body = await _post(client)
    assert (resp.status, body, resp.headers["x-ccx-channel"]) == (200, SSE_BODY, "b")


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_client_errors_are_returned_without_failover(start_gateway, pair, status: int) -> None:
    a, b = pair
    a.reply = _error(status)
    client = await start_gateway(channel("a", a.url, priority=1), channel("b", b.url, priority=2))
    resp, body = await _post(client)
    assert resp.status == status and b"upstream says" in body
    assert resp.headers["x-ccx-channel"] == "a"
    assert b.requests == []


async def test_429_cools_the_key_down_for_retry_after_then_it_returns(start_gateway, pair) -> None:
    a, b = pair
    clock = FakeClock()
    a.reply = _error(429, **{"retry-after": "20"})
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock
    )
    assert (await _post(client))[0].headers["x-ccx-channel"] == "b"
    a.reply = Reply()
    clock.advance(19)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "b"  # still cooling: a not even asked
    assert len(a.requests) == 1
    clock.advance(2)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "a"


async def test_ratelimit_reset_header_sets_the_cooldown(start_gateway, pair) -> None:
    import datetime

    a, b = pair
    clock = FakeClock()
    reset = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)).isoformat()
    a.reply = _error(429, **{"anthropic-ratelimit-requests-reset": reset})
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock
    )
    await _post(client)
    a.reply = Reply()
    clock.advance(50)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "b"
    clock.advance(15)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "a"


async def test_529_backs_the_channel_off_without_disabling_keys(start_gateway, pair) -> None:
    a, b = pair
    clock = FakeClock()
    a.reply = _error(529)
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock, overloadBackoffMs=2000
    )
    await _post(client)
    a.reply = Reply()
    assert (await _post(client))[0].headers["x-ccx-channel"] == "b"
    clock.advance(2.5)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "a"
    health = client.server.app[GATEWAY].health.get("a")
    assert not any(k.disabled for k in health.keys.values())


async def test_401_on_one_key_of_two_moves_to_the_other_and_disables_it(start_gateway, fake_upstream) -> None:
    fake_upstream.reply = lambda req: _error(401) if req.header("x-api-key") == "sk-bad-key-0001" else Reply()
    client = await start_gateway(
        channel("a", fake_upstream.url, apiKeys=["sk-bad-key-0001", "sk-good-key-0002"])
    )
    for _ in range(3):
        resp, body = await _post(client)
        assert (resp.status, body) == (200, SSE_BODY)
        assert b"sk-bad" not in body
    keys_used = [r.header("x-api-key") for r in fake_upstream.requests]
    assert keys_used == ["sk-bad-key-0001", "sk-good-key-0002", "sk-good-key-0002", "sk-good-key-0002"]


async def test_every_candidate_failing_returns_the_last_upstream_error(start_gateway, pair) -> None:
    a, b = pair
    a.reply, b.reply = _error(500), _error(503, **{"request-id": "req_b"})
    client = await start_gateway(channel("a", a.url, priority=1), channel("b", b.url, priority=2))
    resp, body = await _post(client)
    assert resp.status == 503 and b"upstream says 503" in body
    assert resp.headers["request-id"] == "req_b" and resp.headers["x-ccx-channel"] == "b"


async def test_every_candidate_unreachable_is_a_503_naming_channels_not_keys(start_gateway) -> None:
    client = await start_gateway(
        channel("one", f"http://127.0.0.1:{unused_port()}", priority=1),
        channel("two", f"http://127.0.0.1:{unused_port()}", priority=2),
    )
    resp, body = await _post(client)
    assert resp.status == 503
    message = assert_anthropic_error(503, body, "overloaded_error")
    assert "'one'" in message and "'two'" in message and "unreachable" in message
    _no_secret(body, resp)


async def test_max_attempts_bounds_the_failover(start_gateway, pair) -> None:
    a, b = pair
    a.reply = _error(500)
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), maxAttempts=1
    )
    resp, _ = await _post(client)
    assert resp.status == 500 and b.requests == []


async def test_extra_base_urls_are_tried_within_the_channel(start_gateway, fake_upstream) -> None:
    client = await start_gateway(
        channel("a", f"http://127.0.0.1:{unused_port()}", baseUrls=[fake_upstream.url + "/mirror"])
    )
    resp, body = await _post(client)
    assert (resp.status, body, resp.headers["x-ccx-channel"]) == (200, SSE_BODY, "a")
    assert fake_upstream.requests[0].path == "/mirror/v1/messages"


async def test_circuit_opens_after_consecutive_failures_and_half_opens_later(start_gateway, pair) -> None:
    a, b = pair
    clock = FakeClock()
    a.reply = _error(500)
    breaker = {"consecutiveFailures": 3, "openMs": 10_000, "maxOpenMs": 40_000}
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock, circuitBreaker=breaker
    )
    for _ in range(5):
        assert (await _post(client))[0].headers["x-ccx-channel"] == "b"
    assert len(a.requests) == 3  # open after the third failure: a is skipped
    clock.advance(10.5)
    await _post(client)  # the half-open probe fails: open again, for twice as long
    assert len(a.requests) == 4
    a.reply = Reply()
    clock.advance(15)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "b"
    clock.advance(6)
    assert (await _post(client))[0].headers["x-ccx-channel"] == "a"  # probe succeeds: closed
    assert (await _post(client))[0].headers["x-ccx-channel"] == "a"


async def test_circuit_breaker_can_be_switched_off(start_gateway, pair) -> None:
    a, b = pair
    a.reply = _error(500)
    client = await start_gateway(
        channel("a", a.url, priority=1),
        channel("b", b.url, priority=2),
        circuitBreaker={"enabled": False, "consecutiveFailures": 1},
    )
    for _ in range(4):
        await _post(client)
    assert len(a.requests) == 4


async def test_session_affinity_keeps_a_session_on_its_channel(start_gateway, pair) -> None:
    a, b = pair
    clock = FakeClock()
    a.reply = _error(429, **{"retry-after": "1"})
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock
    )
    sticky = {"X-Claude-Code-Session-Id": "session-1"}
    assert (await _post(client, sticky))[0].headers["x-ccx-channel"] == "b"
    a.reply = Reply()
    clock.advance(5)
    assert (await _post(client, sticky))[0].headers["x-ccx-channel"] == "b"  # stays while b is healthy
    assert (await _post(client, {"X-Claude-Code-Session-Id": "session-2"}))[0].headers["x-ccx-channel"] == "a"
    by_user = {"metadata": {"user_id": "user-7"}}
    b.reply = _error(500)
    assert (await _post(client, **by_user))[0].headers["x-ccx-channel"] == "a"
    b.reply = Reply()
    assert (await _post(client, **by_user))[0].headers["x-ccx-channel"] == "a"
    clock.advance(31 * 60)  # idle past the TTL: the session is forgotten
    assert (await _post(client, sticky))[0].headers["x-ccx-channel"] == "a"


async def test_x_channel_pins_a_channel(start_gateway, pair) -> None:
    a, b = pair
    client = await start_gateway(channel("a", a.url, priority=1), channel("b", b.url, priority=2))
    resp, _ = await _post(client, {"X-Channel": "b"})
    assert resp.headers["x-ccx-channel"] == "b" and "x-channel" not in b.requests[0].headers
    resp, body = await _post(client, {"X-Channel": "nope"})
    assert resp.status == 400 and "no channel named 'nope'" in assert_anthropic_error(
        400, body, "invalid_request_error"
    )
    b.reply = _error(500)
    resp, _ = await _post(client, {"X-Channel": "b"})
    assert resp.status == 500 and len(a.requests) == 0  # pinned: no failover to other channels


async def test_x_channel_can_be_switched_off(start_gateway, pair) -> None:
    a, b = pair
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), allowChannelHeader=False
    )
    resp, _ = await _post(client, {"X-Channel": "b"})
    assert resp.headers["x-ccx-channel"] == "a"


async def test_stall_mid_stream_is_an_sse_error_not_a_failover(start_gateway, pair) -> None:
    a, b = pair
    hold = asyncio.Event()

    async def gate(i: int) -> None:
        await hold.wait()

    cut = SSE_BODY.index(b"\n\n") + 2 + 40  # the first event whole (the client has a byte), then 40
    a.reply = Reply(chunks=[SSE_BODY[:cut], SSE_BODY[cut:]], gate=gate)
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), keepaliveMs=0, **FAST
    )
    resp, body = await asyncio.wait_for(_post(client), 10)
    assert resp.headers["x-ccx-channel"] == "a"
    assert body.startswith(SSE_BODY[:cut] + b"\n\nevent: error\ndata: ")
    assert b"stalled" in body and body.endswith(b"\n\n") and b.requests == []
    hold.set()


async def test_stream_ending_before_message_stop_gets_an_error_event(start_gateway, fake_upstream) -> None:
    complete_looking = SSE_BODY[: SSE_BODY.index(b"event: message_stop")]
    fake_upstream.reply = Reply(chunks=[complete_looking])
    client = await start_gateway(channel("a", fake_upstream.url))
    _, body = await _post(client)
    assert body.startswith(complete_looking)
    assert body[len(complete_looking) :].startswith(b"event: error\ndata: ")
    assert b"before message_stop" in body


async def test_upstream_error_event_is_a_proper_end(start_gateway, fake_upstream) -> None:
    stream = SSE_BODY[:60].rsplit(b"\n\n", 1)[0] + b"\n\n"
    stream += b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"x"}}\n\n'
    fake_upstream.reply = Reply(chunks=[stream])
    client = await start_gateway(channel("a", fake_upstream.url))
    _, body = await _post(client)
    assert body == stream


async def test_keepalive_comments_only_at_event_boundaries(start_gateway, fake_upstream) -> None:
    events = [
        b"event: message_start\ndata: {}\n\n",
        b"event: ping\ndata: {}\n",  # the ping event is split across a pause ...
        b"\n",  # ... and ends here
        b"event: message_stop\ndata: {}\n\n",
    ]
    gates = [asyncio.Event() for _ in events]

    async def gate(i: int) -> None:
        await gates[i].wait()

    fake_upstream.reply = Reply(chunks=events, gate=gate)
    client = await start_gateway(
        channel("a", fake_upstream.url), keepaliveMs=100, streamInactivityTimeoutMs=5000
    )
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    received = bytearray()

    async def read_until(done: Callable[[bytes], bool]) -> None:
        async with asyncio.timeout(5):
            while not done(bytes(received)):
                received.extend(await resp.content.readany())

    # At a boundary: a keepalive comes after the quiet interval.
    await read_until(lambda b: b == events[0] + KEEPALIVE)
    gates[1].set()
    await read_until(lambda b: b.endswith(events[1]))
    # Inside the ping event: five quiet intervals and no comment may be written.
    await asyncio.sleep(0.5)
    gates[2].set()
    await read_until(lambda b: b.endswith(events[2] + KEEPALIVE))  # a boundary again
    gates[3].set()
    await read_until(lambda b: b.endswith(events[3]))
    assert bytes(received) == events[0] + KEEPALIVE + events[1] + events[2] + KEEPALIVE + events[3]


async def test_slow_reader_pauses_the_upstream_and_gets_every_byte(start_gateway, fake_upstream) -> None:
    chunk = b"event: content_block_delta\ndata: " + (b"x" * 16_000) + b"\n\n"
    big = [chunk] * 4000 + [b"event: message_stop\ndata: {}\n\n"]  # 64 MB
    total = sum(map(len, big))
    fake_upstream.reply = Reply(chunks=big)
    client = await start_gateway(channel("a", fake_upstream.url))
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    received = bytearray(await resp.content.readany())
    # The client stops reading.  Flow control must stop the upstream too: its writes stall
    # once the gateway's buffer (256 KB) and the sockets' buffers (about 12 MB on loopback
    # here, autotuned) are full, far short of the whole 64 MB.  Without it the gateway
    # would read everything into memory.
    last, still = -1, 0
    async with asyncio.timeout(10):
        while still < 5:  # unchanged over five looks 50 ms apart: stalled
            await asyncio.sleep(0.05)
            still = still + 1 if fake_upstream.sent == last else 0
            last = fake_upstream.sent
    stalled_at = fake_upstream.sent
    while data := await resp.content.read(1 << 20):  # read on before asserting: no hung teardown
        received += data
    assert stalled_at < total // 2, (stalled_at, total)
    assert bytes(received) == b"".join(big)


async def test_cut_mid_stream_is_an_sse_error_not_a_failover(start_gateway, pair) -> None:
    a, b = pair
    cut = SSE_BODY.index(b"\n\n") + 2 + 70  # after the first event: bytes reached the client
    a.reply = Reply(chunks=[SSE_BODY[:cut]], cut=True)
    client = await start_gateway(channel("a", a.url, priority=1), channel("b", b.url, priority=2))
    resp, body = await _post(client)
    assert resp.status == 200 and resp.headers["x-ccx-channel"] == "a"
    assert body.startswith(SSE_BODY[:cut] + b"\n\nevent: error\ndata: ") and b"broke off" in body
    assert b.requests == []
    _no_secret(body, resp)
    health = client.server.app[GATEWAY].health.get("a")
    assert health.breaker.consecutive == 1  # counted against the upstream


async def test_cut_inside_the_first_event_fails_over_before_any_byte(start_gateway, pair) -> None:
    a, b = pair
    a.reply = Reply(chunks=[SSE_BODY[:40]], cut=True)  # not even the first event is whole
    client = await start_gateway(channel("a", a.url, priority=1), channel("b", b.url, priority=2))
    resp, body = await _post(client)
    assert resp.status == 200 and resp.headers["x-ccx-channel"] == "b" and body == SSE_BODY


async def test_client_leaving_during_an_error_body_releases_the_half_open_probe(
    start_gateway, make_upstream
) -> None:
    a = await make_upstream()
    clock = FakeClock()
    hold = asyncio.Event()

    async def gate(i: int) -> None:
        await hold.wait()

    client = await start_gateway(channel("a", a.url), clock=clock, circuitBreaker={"consecutiveFailures": 1})
    a.reply = _error(500)
    await _post(client)  # opens the circuit
    health = client.server.app[GATEWAY].health.get("a")
    assert health.breaker.state.value == "open"
    clock.advance(10)
    a.reply = Reply(status=500, headers=ERROR_JSON, chunks=[b'{"type":"error",', b"never"], gate=gate)
    task = asyncio.ensure_future(client.post("/v1/messages", data=message_body(), headers=AUTH))
    for _ in range(200):
        if a.requests and health.breaker.state.value == "half-open":
            break
        await asyncio.sleep(0.01)
    task.cancel()  # the client gives up while the probe's error body is still coming
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(200):
        if health.breaker.available(clock()):
            break
        await asyncio.sleep(0.01)
    assert health.breaker.available(clock())  # the probe slot was handed back
    hold.set()


async def test_an_upstream_echoing_the_key_in_its_error_never_shows_it(start_gateway, fake_upstream) -> None:
    body = orjson.dumps(
        {
            "type": "error",
            "error": {"type": "authentication_error", "message": f"key {UPSTREAM_KEY} was revoked"},
        }
    )
    # A 400 is relayed with the upstream's own body (401s become the gateway's 502: see
    # test_availability), with the key in it masked.
    fake_upstream.reply = Reply(status=400, headers=ERROR_JSON, chunks=[body])
    client = await start_gateway(channel("a", fake_upstream.url))
    resp, raw = await _post(client)
    assert resp.status == 400
    _no_secret(raw, resp)
    assert "sk-…wxyz was revoked".encode() in raw


async def test_a_stall_after_message_stop_is_a_clean_end(start_gateway, fake_upstream) -> None:
    hold = asyncio.Event()

    async def gate(i: int) -> None:
        await hold.wait()

    fake_upstream.reply = Reply(chunks=[SSE_BODY, b"never"], gate=gate)  # complete, then silence
    client = await start_gateway(channel("a", fake_upstream.url), keepaliveMs=0, **FAST)
    resp, body = await asyncio.wait_for(_post(client), 10)
    assert body == SSE_BODY  # no error event appended to a finished stream
    health = client.server.app[GATEWAY].health.get("a")
    assert health.breaker.consecutive == 0
    hold.set()


KIMI_403 = orjson.dumps(
    {
        "error": {
            "message": "Kimi For Coding is currently only available for Coding Agents such as Kimi CLI, "
            "Claude Code, Roo Code, Kilo Code, etc.",
            "type": "access_terminated_error",
        }
    }
)


async def test_a_403_that_refuses_the_client_keeps_the_key_and_is_relayed(start_gateway, pair) -> None:
    """Kimi's coding endpoint turns away non-coding-agent clients with a 403: not the key's fault."""
    a, b = pair
    a.reply = Reply(status=403, headers=ERROR_JSON, chunks=[KIMI_403])
    client = await start_gateway(channel("kimi", a.url))
    for _ in range(2):  # the key stays in rotation: the second request reaches the upstream too
        resp, body = await _post(client)
        assert resp.status == 403 and b"only available for Coding Agents" in body
    assert len(a.requests) == 2
    # With another channel, the request goes there.
    client = await start_gateway(channel("kimi", a.url, priority=1), channel("other", b.url, priority=2))
    resp, _ = await _post(client)
    assert resp.status == 200 and resp.headers["x-ccx-channel"] == "other"
    a.reply = Reply()  # a coding agent's request on the same key still works
    resp, _ = await _post(client, {"X-Channel": "kimi"})
    assert resp.status == 200 and resp.headers["x-ccx-channel"] == "kimi"
