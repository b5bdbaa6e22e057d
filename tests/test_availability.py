"""Availability never below going direct.

* a 429 cools down the (key, model) pair, not the whole key;
* when soft state (a 429 cool-down, a 529 back-off, an open breaker) holds back every
  candidate, the request goes anyway to the one that frees up soonest ("panic routing");
* the gateway answers with its own 503 only when nothing could be tried, with Retry-After;
* gateway-made errors a retry cannot fix carry ``x-should-retry: false``;
* streaming requests wait ``responseHeaderTimeoutMs`` for the response head, non-streaming
  ones ``nonStreamTimeoutMs``, globally and per channel;
* the anthropic SDK's own retries get through a single 529 / 429 as they do direct.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import orjson
import pytest

from ccx_proxy.config import parse_config
from ccx_proxy.health import ChannelHealth
from ccx_proxy.state import GATEWAY
from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    SSE_BODY,
    UPSTREAM_KEY,
    FakeClock,
    FakeUpstream,
    Recorded,
    Reply,
    assert_anthropic_error,
    channel,
    make_settings,
    message_body,
    unused_port,
)

ERROR_JSON = {"Content-Type": "application/json"}
KEY_1 = "sk-upstream-first-key-0001"
KEY_2 = "sk-upstream-second-key-0002"


def _error(status: int, **headers: str) -> Reply:
    body = orjson.dumps(
        {"type": "error", "error": {"type": "upstream_error", "message": f"upstream says {status}"}}
    )
    return Reply(status=status, headers={**ERROR_JSON, **headers}, chunks=[body])


def _message(text: str = "served") -> Reply:
    body = orjson.dumps(
        {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    return Reply(headers=ERROR_JSON, chunks=[body])


def _first_then_ok(fake: FakeUpstream, first: Reply, then: Reply | None = None) -> None:
    """The upstream answers ``first`` to its first request and ``then`` (a stream) after."""
    after = then or Reply()
    fake.reply = lambda req: first if len(fake.requests) == 1 else after


async def _post(client: Any, model: str = "claude-sonnet-4-6", **kw: Any) -> tuple[Any, bytes]:
    resp = await client.post("/v1/messages", data=message_body(model, **kw), headers=AUTH)
    return resp, await resp.read()


def _health(client: Any, name: str) -> ChannelHealth:
    health = client.server.app[GATEWAY].health.get(name)
    assert health is not None
    return health


# --- 429 is per (key, model) -------------------------------------------------------------


async def test_429_cools_down_the_key_model_pair_not_the_whole_key(start_gateway, fake_upstream) -> None:
    limited = {(KEY_1, "model-a")}  # what the upstream rate-limits

    def reply(req: Recorded) -> Reply:
        if (req.header("x-api-key"), req.json()["model"]) in limited:
            return _error(429, **{"retry-after": "60"})
        return Reply()

    fake_upstream.reply = reply
    clock = FakeClock()
    client = await start_gateway(channel("a", fake_upstream.url, apiKeys=[KEY_1, KEY_2]), clock=clock)

    resp, body = await _post(client, "model-a")  # KEY_1 429s for model-a: same request, KEY_2
    assert (resp.status, body) == (200, SSE_BODY)
    clock.advance(30)  # half the cool-down
    resp, body = await _post(client, "model-a")  # (KEY_1, model-a) is cooling: KEY_2 straight away
    assert (resp.status, body) == (200, SSE_BODY)
    resp, body = await _post(client, "model-b")  # KEY_1 still serves model-b
    assert (resp.status, body) == (200, SSE_BODY)
    limited.clear()
    clock.advance(31)  # the cool-down is over: KEY_1 serves model-a again
    resp, body = await _post(client, "model-a")
    assert (resp.status, body) == (200, SSE_BODY)

    sent = [(r.header("x-api-key"), r.json()["model"]) for r in fake_upstream.requests]
    assert sent == [
        (KEY_1, "model-a"),
        (KEY_2, "model-a"),
        (KEY_2, "model-a"),
        (KEY_1, "model-b"),
        (KEY_1, "model-a"),
    ]


# --- panic routing ----------------------------------------------------------------------

# Each soft state: the upstream's failing answer, the gateway's settings, and a check that
# the state really holds the channel (or its key) back after that answer.
SOFT_STATES = [
    pytest.param(
        _error(529),
        {"overloadBackoffMs": 60_000},
        lambda h, now: h.backoff_until > now,
        id="529-backoff",
    ),
    pytest.param(
        _error(429),
        {},  # rateLimitCooldownMs: 5 s by default, and the fake clock stands still
        lambda h, now: h.keys[UPSTREAM_KEY].cooling("claude-sonnet-4-6", now) > 0,
        id="429-without-retry-after",
    ),
    pytest.param(
        _error(429, **{"retry-after": "60"}),
        {},
        lambda h, now: h.keys[UPSTREAM_KEY].cooling("claude-sonnet-4-6", now) > 0,
        id="429-retry-after",
    ),
    pytest.param(
        _error(500),
        {"circuitBreaker": {"consecutiveFailures": 1, "openMs": 60_000}},
        lambda h, now: not h.breaker.available(now),
        id="open-breaker",
    ),
]


@pytest.mark.parametrize(("failure", "top", "held_back"), SOFT_STATES)
async def test_single_channel_held_back_is_still_tried_and_serves(
    start_gateway,
    fake_upstream,
    failure: Reply,
    top: dict[str, Any],
    held_back: Callable[[ChannelHealth, float], bool],
) -> None:
    clock = FakeClock()
    _first_then_ok(fake_upstream, failure)
    client = await start_gateway(channel("a", fake_upstream.url), clock=clock, **top)
    resp, body = await _post(client)
    assert resp.status == failure.status and b"upstream says" in body  # the upstream's own answer
    assert held_back(_health(client, "a"), clock())

    resp, body = await _post(client)  # going direct would be served: so is the gateway
    assert (resp.status, body) == (200, SSE_BODY)
    assert resp.headers["x-ccx-channel"] == "a"
    assert len(fake_upstream.requests) == 2


async def test_panic_try_that_fails_again_relays_the_upstream_answer(start_gateway, fake_upstream) -> None:
    clock = FakeClock()
    fake_upstream.reply = _error(529, **{"request-id": "req_up"})
    client = await start_gateway(channel("a", fake_upstream.url), clock=clock)
    for _ in range(3):
        resp, body = await _post(client)
        assert resp.status == 529 and b"upstream says 529" in body  # not a gateway 503
        assert resp.headers["request-id"] == "req_up"
    assert len(fake_upstream.requests) == 3


@pytest.mark.parametrize(("failure", "top", "held_back"), SOFT_STATES)
async def test_held_back_channel_is_skipped_while_another_serves(
    start_gateway,
    make_upstream,
    failure: Reply,
    top: dict[str, Any],
    held_back: Callable[[ChannelHealth, float], bool],
) -> None:
    a, b = await make_upstream(), await make_upstream()
    clock = FakeClock()
    _first_then_ok(a, failure)
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock, **top
    )
    for _ in range(3):
        resp, body = await _post(client)
        assert (resp.status, body, resp.headers["x-ccx-channel"]) == (200, SSE_BODY, "b")
    assert held_back(_health(client, "a"), clock())
    assert len(a.requests) == 1 and len(b.requests) == 3


async def _unreachable(fake: FakeUpstream) -> str:
    return f"http://127.0.0.1:{unused_port()}"


async def _hanging(fake: FakeUpstream) -> str:
    fake.reply = Reply(before=5)
    return fake.url


@pytest.mark.parametrize(
    "other",
    [pytest.param(_unreachable, id="other-unreachable"), pytest.param(_hanging, id="other-times-out")],
)
async def test_held_back_channel_is_tried_when_the_rest_fail_without_an_answer(
    start_gateway, make_upstream, other: Any
) -> None:
    a, b = await make_upstream(), await make_upstream()
    clock = FakeClock()
    _first_then_ok(a, _error(529))
    client = await start_gateway(
        channel("a", a.url, priority=1),
        channel("b", await other(b), priority=2),
        clock=clock,
        overloadBackoffMs=60_000,
        responseHeaderTimeoutMs=200,
    )
    resp, body = await _post(client)  # a: 529, b: no answer -> a's 529
    assert resp.status == 529 and b"upstream says 529" in body

    resp, body = await _post(client)  # a backs off, b gives no answer: a anyway, not a gateway 503
    assert (resp.status, body, resp.headers["x-ccx-channel"]) == (200, SSE_BODY, "a")
    assert len(a.requests) == 2


@pytest.mark.parametrize(
    ("a_fails", "b_fails", "top", "expected"),
    [
        pytest.param(
            _error(429, **{"retry-after": "40"}),
            _error(429, **{"retry-after": "20"}),
            {},
            "b",
            id="cooldowns-b-ends-first",
        ),
        pytest.param(
            _error(429, **{"retry-after": "20"}),
            _error(429, **{"retry-after": "40"}),
            {},
            "a",
            id="cooldowns-a-ends-first",
        ),
        pytest.param(
            _error(529),
            _error(429, **{"retry-after": "20"}),
            {"overloadBackoffMs": 40_000},
            "b",
            id="backoff-vs-shorter-cooldown",
        ),
        pytest.param(
            _error(429, **{"retry-after": "40"}),
            _error(529),
            {"overloadBackoffMs": 20_000},
            "b",
            id="cooldown-vs-shorter-backoff",
        ),
        pytest.param(
            _error(500),
            _error(429, **{"retry-after": "40"}),
            {"circuitBreaker": {"consecutiveFailures": 1, "openMs": 20_000}},
            "a",
            id="open-breaker-vs-longer-cooldown",
        ),
    ],
)
async def test_panic_pick_is_the_candidate_that_frees_up_soonest(
    start_gateway, make_upstream, a_fails: Reply, b_fails: Reply, top: dict[str, Any], expected: str
) -> None:
    a, b = await make_upstream(), await make_upstream()
    clock = FakeClock()
    _first_then_ok(a, a_fails)
    _first_then_ok(b, b_fails)
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=clock, **top
    )
    resp, _ = await _post(client)  # a fails, then b: both are held back now
    assert resp.status == b_fails.status and (len(a.requests), len(b.requests)) == (1, 1)
    clock.advance(10)  # both still held back (10 s and 30 s left)

    resp, body = await _post(client)
    assert (resp.status, body, resp.headers["x-ccx-channel"]) == (200, SSE_BODY, expected)
    assert len(a.requests) + len(b.requests) == 3  # one panic try, on the soonest only


# --- the gateway's own 503: only when nothing could be tried ---------------------------


async def test_keys_the_upstream_refuses_are_a_502_the_client_cannot_fix(
    start_gateway, make_upstream
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.reply, b.reply = _error(401), _error(403)
    client = await start_gateway(
        channel("a", a.url, priority=1), channel("b", b.url, priority=2), clock=FakeClock()
    )
    # Both channels' keys are refused: the client's own key was fine, so it is not told
    # "401" (Claude Code would say "Failed to authenticate") and must not retry.
    resp, body = await _post(client)
    message = assert_anthropic_error(502, body, "api_error")
    assert resp.status == 502 and resp.headers["x-should-retry"] == "false"
    assert "upstream channel 'b' refused the gateway's key (403 " in message
    assert "your own key is fine" in message

    for _ in range(2):  # no key left anywhere: nothing to try, so the gateway answers itself
        resp, body = await _post(client)
        message = assert_anthropic_error(502, body, "api_error")
        assert resp.status == 502 and resp.headers["x-should-retry"] == "false"
        assert "a key sk-…wxyz" in message and "b key sk-…wxyz" in message
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_gateway_503_with_retry_after_when_attempts_are_spent(start_gateway, make_upstream) -> None:
    b = await make_upstream()
    b.reply = _error(529)
    client = await start_gateway(
        channel("b", b.url, priority=1),
        channel("a", f"http://127.0.0.1:{unused_port()}", priority=2),  # nothing listens
        clock=FakeClock(),
        maxAttempts=1,
        overloadBackoffMs=30_000,
    )
    resp, _ = await _post(client)  # b: 529, its own answer; b backs off for 30 s
    assert resp.status == 529
    # b is held back; a is tried and unreachable; the one attempt is spent: nothing is left
    # to try, so the gateway answers itself, saying when b frees up.
    resp, body = await _post(client)
    message = assert_anthropic_error(503, body, "overloaded_error")
    assert resp.status == 503 and resp.headers["Retry-After"] == "30"
    assert "x-should-retry" not in resp.headers
    assert "b: overloaded (529)" in message and "a (127.0.0.1)" in message
    assert len(b.requests) == 1


# --- x-should-retry: false on what a retry cannot fix ----------------------------------


async def _bad_json(client: Any) -> Any:
    return await client.post("/v1/messages", data=b'{"model": ', headers=AUTH)


async def _wrong_key(client: Any) -> Any:
    return await client.post("/v1/messages", data=message_body(), headers={"x-api-key": "wrong"})


async def _missing_key(client: Any) -> Any:
    return await client.post("/v1/messages", data=message_body())


async def _unknown_path(client: Any) -> Any:
    return await client.post("/v1/nothing-here", data=message_body(), headers=AUTH)


async def _unknown_model(client: Any) -> Any:
    return await client.post("/v1/messages", data=message_body("gpt-4o"), headers=AUTH)


async def _wrong_method(client: Any) -> Any:
    return await client.get("/v1/messages", headers=AUTH)


async def _too_large(client: Any) -> Any:
    return await client.post("/v1/messages", data=message_body(system="x" * 4096), headers=AUTH)


async def _too_large_chunked(client: Any) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        yield message_body(system="x" * 4096)

    return await client.post("/v1/messages", data=chunks(), headers=AUTH)  # no Content-Length


@pytest.mark.parametrize(
    ("send", "status", "error_type"),
    [
        pytest.param(_bad_json, 400, "invalid_request_error", id="400-bad-json"),
        pytest.param(_wrong_key, 401, "authentication_error", id="401-wrong-key"),
        pytest.param(_missing_key, 401, "authentication_error", id="401-missing-key"),
        pytest.param(_unknown_path, 404, "not_found_error", id="404-unknown-path"),
        pytest.param(_unknown_model, 400, "invalid_request_error", id="400-model-not-found"),
        pytest.param(_wrong_method, 405, "invalid_request_error", id="405-method"),
        pytest.param(_too_large, 413, "request_too_large", id="413-body-too-large"),
        pytest.param(_too_large_chunked, 413, "request_too_large", id="413-chunked-body-too-large"),
    ],
)
async def test_gateway_errors_a_retry_cannot_fix_say_do_not_retry(
    start_gateway, fake_upstream, send: Any, status: int, error_type: str
) -> None:
    client = await start_gateway(
        channel("a", fake_upstream.url, supportedModels=["claude-*"]),
        settings=make_settings(max_body_bytes=2048),
    )
    resp = await send(client)
    body = await resp.read()
    assert resp.status == status
    assert_anthropic_error(status, body, error_type)
    assert resp.headers["x-should-retry"] == "false"
    assert "Retry-After" not in resp.headers
    assert fake_upstream.requests == []


async def _refused(start_gateway: Any, fake_upstream: FakeUpstream) -> Any:
    return await start_gateway(channel("a", f"http://127.0.0.1:{unused_port()}"))


async def _all_refused(start_gateway: Any, fake_upstream: FakeUpstream) -> Any:
    return await start_gateway(
        channel("a", f"http://127.0.0.1:{unused_port()}", priority=1),
        channel("b", f"http://127.0.0.1:{unused_port()}", priority=2),
    )


async def _hangs(start_gateway: Any, fake_upstream: FakeUpstream) -> Any:
    fake_upstream.reply = Reply(before=5)
    return await start_gateway(channel("a", fake_upstream.url), responseHeaderTimeoutMs=200)


@pytest.mark.parametrize(
    ("setup", "status", "error_type"),
    [
        pytest.param(_refused, 502, "api_error", id="502-unreachable"),
        pytest.param(_all_refused, 503, "overloaded_error", id="503-nothing-answered"),
        pytest.param(_hangs, 504, "timeout_error", id="504-timeout"),
    ],
)
async def test_gateway_errors_a_retry_may_fix_do_not_say_do_not_retry(
    start_gateway, fake_upstream, setup: Any, status: int, error_type: str
) -> None:
    client = await setup(start_gateway, fake_upstream)
    resp, body = await _post(client)
    assert resp.status == status
    assert_anthropic_error(status, body, error_type)
    assert "x-should-retry" not in resp.headers
    if status == 503:
        assert int(resp.headers["Retry-After"]) >= 1


# --- first-byte timeouts: streaming vs non-streaming ------------------------------------


@pytest.mark.parametrize(
    ("top", "own", "stream", "status"),
    [
        pytest.param(
            {"responseHeaderTimeoutMs": 200, "nonStreamTimeoutMs": 1500},
            {},
            True,
            504,
            id="stream-waits-responseHeaderTimeoutMs",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 200, "nonStreamTimeoutMs": 1500},
            {},
            False,
            200,
            id="non-stream-waits-nonStreamTimeoutMs",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 1500, "nonStreamTimeoutMs": 200},
            {},
            False,
            504,
            id="non-stream-short-nonStreamTimeoutMs",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 1500, "nonStreamTimeoutMs": 200},
            {},
            True,
            200,
            id="stream-long-responseHeaderTimeoutMs",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 200, "nonStreamTimeoutMs": 200},
            {"nonStreamTimeoutMs": 1500},
            False,
            200,
            id="channel-nonStreamTimeoutMs-lengthens",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 1500, "nonStreamTimeoutMs": 1500},
            {"nonStreamTimeoutMs": 200},
            False,
            504,
            id="channel-nonStreamTimeoutMs-shortens",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 200, "nonStreamTimeoutMs": 200},
            {"responseHeaderTimeoutMs": 1500},
            True,
            200,
            id="channel-responseHeaderTimeoutMs-lengthens",
        ),
        pytest.param(
            {"responseHeaderTimeoutMs": 1500, "nonStreamTimeoutMs": 1500},
            {"responseHeaderTimeoutMs": 200},
            True,
            504,
            id="channel-responseHeaderTimeoutMs-shortens",
        ),
    ],
)
async def test_first_byte_timeout_depends_on_streaming(
    start_gateway, fake_upstream, top: dict[str, int], own: dict[str, int], stream: bool, status: int
) -> None:
    answer = Reply() if stream else _message()
    fake_upstream.reply = Reply(status=200, headers=answer.headers, chunks=answer.chunks, before=0.6)
    client = await start_gateway(channel("a", fake_upstream.url, **own), **top)
    resp, body = await _post(client, stream=stream)
    assert resp.status == status
    if status == 504:
        message = assert_anthropic_error(504, body, "timeout_error")
        assert "'a'" in message
    else:
        assert body == answer.chunks[0]
    assert len(fake_upstream.requests) == 1


def test_first_byte_timeout_defaults() -> None:
    config = parse_config({"channels": [channel("a"), channel("b", nonStreamTimeoutMs=900_000)]}, {})
    a, b = config.channels
    assert (a.timeouts.first_byte(True), a.timeouts.first_byte(False)) == (60.0, 600.0)
    assert (b.timeouts.first_byte(True), b.timeouts.first_byte(False)) == (60.0, 900.0)


# --- the anthropic SDK's own retries, direct and through the gateway -------------------

SDK_RETRIED = [
    pytest.param(_error(529, **{"retry-after-ms": "10"}), id="529"),
    pytest.param(_error(429, **{"retry-after-ms": "10"}), id="429-without-retry-after"),
]


async def _sdk_create(base_url: str, api_key: str) -> anthropic.types.Message:
    # max_retries left at the SDK's default (2); retry-after-ms keeps its wait at 10 ms.
    async with anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, timeout=10) as sdk:
        return await sdk.messages.create(
            model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.parametrize("failure", SDK_RETRIED)
async def test_sdk_retries_get_through_a_single_failure_as_direct(
    start_gateway, make_upstream, failure: Reply
) -> None:
    direct, behind = await make_upstream(), await make_upstream()
    _first_then_ok(direct, failure, _message("direct ok"))
    _first_then_ok(behind, failure, _message("gateway ok"))
    gateway = await start_gateway(channel("a", behind.url), clock=FakeClock())  # soft state never expires

    message = await _sdk_create(direct.url, UPSTREAM_KEY)
    assert message.content[0].type == "text" and message.content[0].text == "direct ok"
    message = await _sdk_create(str(gateway.make_url("")), ACCESS_KEY)
    assert message.content[0].type == "text" and message.content[0].text == "gateway ok"

    assert len(direct.requests) == len(behind.requests) == 2
    assert [r.header("x-stainless-retry-count") for r in behind.requests] == ["0", "1"]
