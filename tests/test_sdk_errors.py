"""Every error the gateway makes, or relays from an upstream, as the official ``anthropic``
SDK sees it: the exception class, ``status_code``, the Anthropic ``error.type``, a message
that says what to do, and the retry headers the SDK obeys (``x-should-retry: false`` on
what a retry cannot fix, ``Retry-After`` on 429/503/529) -- and the SDK's own retries
through the gateway: how many times it really sends a request, and how long it waits.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    FakeUpstream,
    Reply,
    channel,
    make_settings,
    message_body,
    unused_port,
)

Gateway = TestClient[Any, Any]
ADMIN_KEY = "test-admin-key-abcdefghijklmnop"
JSON = {"Content-Type": "application/json"}
MODEL = "claude-sonnet-4-6"
BODY_LIMIT = 4096  # MAX_REQUEST_BODY_SIZE for the gateways that answer before any upstream

# What the response says about retrying.
NEVER = "never"  # x-should-retry: false, no Retry-After: no retry helps
AFTER = "after"  # Retry-After (whole seconds), no x-should-retry
FREE = "free"  # neither: the SDK's own policy decides (it retries 408, 409, 429 and 5xx)

MESSAGE = orjson.dumps(
    {
        "id": "msg_ok",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [{"type": "text", "text": "served"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
)


def upstream_error(status: int, error_type: str, message: str, **headers: str) -> Reply:
    body = orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return Reply(status=status, headers={**JSON, **headers}, chunks=[body])


def error_event(error_type: str, message: str) -> bytes:
    data = orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})
    return b"event: error\ndata: " + data + b"\n\n"


class Tally:
    """What the SDK put on the wire: one entry per HTTP attempt, its retries included."""

    def __init__(self) -> None:
        self.sent: list[float] = []  # monotonic time of each request
        self.statuses: list[int] = []
        self.on_response: Callable[[int], None] | None = None

    async def request(self, request: Any) -> None:
        self.sent.append(time.monotonic())

    async def response(self, response: Any) -> None:
        self.statuses.append(response.status_code)
        if self.on_response is not None:
            self.on_response(response.status_code)


@asynccontextmanager
async def sdk(gateway: Gateway, *, max_retries: int) -> AsyncIterator[tuple[anthropic.AsyncAnthropic, Tally]]:
    tally = Tally()
    http = anthropic.DefaultAsyncHttpxClient(
        event_hooks={"request": [tally.request], "response": [tally.response]}
    )
    client = anthropic.AsyncAnthropic(
        api_key=ACCESS_KEY,
        base_url=str(gateway.make_url("")),
        max_retries=max_retries,
        timeout=5,
        http_client=http,
    )
    try:
        yield client, tally
    finally:
        await client.close()


class Held:
    """An upstream that answers a message, but holds its first ``hold`` requests (all, when
    None) until ``release`` is set: a stream in flight, or an upstream that never answers."""

    def __init__(self, release: asyncio.Event, hold: int | None) -> None:
        self.release = release
        self.hold = hold
        self.hits = 0
        self.arrived = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await request.read()
        self.arrived.set()
        if self.hold is None or self.hits <= self.hold:
            await self.release.wait()
        return web.Response(body=MESSAGE, content_type="application/json")


@dataclass
class Env:
    """What a case builds its gateway from; everything held is released at teardown."""

    start: Callable[..., Awaitable[Gateway]]
    make_upstream: Callable[[], Awaitable[FakeUpstream]]
    aiohttp_server: Any
    tmp_path: Path
    release: asyncio.Event = field(default_factory=asyncio.Event)
    fakes: list[FakeUpstream] = field(default_factory=list)
    helds: list[Held] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def upstream(self, reply: Reply) -> FakeUpstream:
        fake = await self.make_upstream()
        fake.reply = reply
        self.fakes.append(fake)
        return fake

    async def held(self, hold: int | None = None) -> Held:
        held = Held(self.release, hold)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", held.handle)
        server = await self.aiohttp_server(app)
        held.url = str(server.make_url("")).rstrip("/")
        self.helds.append(held)
        return held

    def hits(self) -> int:
        """Requests that reached any upstream."""
        return sum(len(f.requests) for f in self.fakes) + sum(h.hits for h in self.helds)


@pytest.fixture
async def env(
    start_gateway: Any, make_upstream: Any, aiohttp_server: Any, tmp_path: Path
) -> AsyncIterator[Env]:
    environment = Env(start_gateway, make_upstream, aiohttp_server, tmp_path)
    yield environment
    environment.release.set()
    if environment.tasks:
        async with asyncio.timeout(5):
            await asyncio.gather(*environment.tasks, return_exceptions=True)


# --- gateways --------------------------------------------------------------------------


async def _serving(env: Env) -> Gateway:
    """A gateway that answers the request itself: it never reaches the upstream."""
    up = await env.upstream(Reply())
    return await env.start(
        channel("a", up.url, supportedModels=["claude-*"]),
        settings=make_settings(max_body_bytes=BODY_LIMIT),
    )


def _relaying(*replies: Reply) -> Callable[[Env], Awaitable[Gateway]]:
    """A gateway with one channel per reply, tried in order."""

    async def build(env: Env) -> Gateway:
        ups = [await env.upstream(reply) for reply in replies]
        channels = [channel(f"ch{i}", up.url, priority=i + 1) for i, up in enumerate(ups)]
        return await env.start(*channels)

    return build


async def _admin(env: Env) -> Gateway:
    up = await env.upstream(Reply())
    path = env.tmp_path / "channels.json"
    path.write_bytes(orjson.dumps({"channels": [channel("a", up.url)]}))
    return await env.start(
        channel("a", up.url), settings=make_settings(admin_keys=(ADMIN_KEY,), channels_file=str(path))
    )


async def _unreachable(env: Env) -> Gateway:
    return await env.start(channel("a", f"http://127.0.0.1:{unused_port()}"))


async def _all_unreachable(env: Env) -> Gateway:
    return await env.start(
        channel("a", f"http://127.0.0.1:{unused_port()}", priority=1),
        channel("b", f"http://127.0.0.1:{unused_port()}", priority=2),
    )


async def _silent(env: Env) -> Gateway:
    held = await env.held()  # never sends its response head
    return await env.start(channel("a", held.url), responseHeaderTimeoutMs=200, nonStreamTimeoutMs=200)


async def _at_capacity(env: Env) -> Gateway:
    """maxConcurrentStreams: 1, and one request in flight that the upstream holds."""
    held = await env.held(hold=1)
    gateway = await env.start(channel("a", held.url), maxConcurrentStreams=1)
    env.tasks.append(asyncio.create_task(gateway.post("/v1/messages", data=message_body(), headers=AUTH)))
    async with asyncio.timeout(5):
        await held.arrived.wait()
    return gateway


# --- calls -----------------------------------------------------------------------------

Call = Callable[[anthropic.AsyncAnthropic, bool], Awaitable[object]]


def _create(model: str = MODEL, text: str = "hi", **extra: Any) -> Call:
    async def call(client: anthropic.AsyncAnthropic, stream: bool) -> object:
        result: object = await client.messages.create(
            model=model,
            max_tokens=16,
            messages=[{"role": "user", "content": text}],
            stream=stream,
            **extra,
        )
        if isinstance(result, anthropic.AsyncStream):
            async for _ in result:
                pass
        return result

    return call


def _wrong_key() -> Call:
    inner = _create()

    async def call(client: anthropic.AsyncAnthropic, stream: bool) -> object:
        return await inner(client.with_options(api_key="not-the-gateway-key"), stream)

    return call


def _base_url_with_v1() -> Call:
    inner = _create()

    async def call(client: anthropic.AsyncAnthropic, stream: bool) -> object:
        root = str(client.base_url).rstrip("/")
        return await inner(client.with_options(base_url=f"{root}/v1"), stream)

    return call


def _raw(method: str, path: str, content: bytes | None = None, headers: dict[str, str] | None = None) -> Call:
    async def call(client: anthropic.AsyncAnthropic, stream: bool) -> object:
        options: anthropic.RequestOptions = {"headers": headers or {}}
        if method == "get":
            return await client.get(path, cast_to=object, options=options)
        if method == "patch":
            return await client.patch(path, cast_to=object, body={"status": "suspended"}, options=options)
        options["headers"] = {"Content-Type": "application/json", **(headers or {})}
        return await client.post(path, cast_to=object, content=content, options=options)

    return call


# --- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[Env], Awaitable[Gateway]]
    call: Call
    error: type[anthropic.APIStatusError]  # the exact class the SDK raises
    status: int
    error_type: str
    message: str  # a regular expression the message must contain
    retry: str  # NEVER, AFTER or FREE
    hits: int | None = 0  # requests that reach an upstream
    retry_after: str | None = None  # the exact Retry-After, where it is known
    messages: bool = True  # a Messages request (it can stream too); False: a raw request


OVERLOADED_FIRST = Reply(chunks=[error_event("overloaded_error", "Overloaded")])  # a 200 SSE stream


CASES: dict[str, Case] = {
    # The gateway's own answers.
    "400-model-not-found": Case(
        _serving,
        _create("gpt-4o"),
        anthropic.BadRequestError,
        400,
        "invalid_request_error",
        r"^model_not_found: this gateway does not serve model 'gpt-4o'; it serves .*"
        r"\(GET /v1/models lists them\)",
        NEVER,
    ),
    "400-malformed-json": Case(
        _serving,
        _raw("post", "/v1/messages", b'{"model": "claude-sonnet-4-6", '),
        anthropic.BadRequestError,
        400,
        "invalid_request_error",
        r"^request body is not valid JSON",
        NEVER,
        messages=False,
    ),
    "400-base-url-ends-in-v1": Case(
        _serving,
        _base_url_with_v1(),
        anthropic.BadRequestError,
        400,
        "invalid_request_error",
        r"^wrong ANTHROPIC_BASE_URL: set it to the gateway root .* without /v1",
        NEVER,
    ),
    "401-wrong-key": Case(
        _serving,
        _wrong_key(),
        anthropic.AuthenticationError,
        401,
        "authentication_error",
        r"^invalid access key: it does not match the gateway's PROXY_ACCESS_KEY",
        NEVER,
    ),
    "403-admin-disabled": Case(
        _serving,
        _raw("get", "/api/messages/channels"),
        anthropic.PermissionDeniedError,
        403,
        "permission_error",
        r"admin API and console are disabled: set ADMIN_ACCESS_KEY",
        NEVER,
        messages=False,
    ),
    "404-unknown-path": Case(
        _serving,
        _raw("get", "/v1/nothing-here"),
        anthropic.NotFoundError,
        404,
        "not_found_error",
        r"^unknown path /v1/nothing-here: the gateway serves POST /v1/messages",
        NEVER,
        messages=False,
    ),
    "405-wrong-method": Case(
        _serving,
        _raw("get", "/v1/messages"),
        anthropic.APIStatusError,  # no class of its own for 405
        405,
        "invalid_request_error",
        r"^method GET is not allowed on /v1/messages \(use POST\)",
        NEVER,
        messages=False,
    ),
    "409-stale-if-match": Case(
        _admin,
        _raw(
            "patch",
            "/api/messages/channels/a/status",
            headers={"x-api-key": ADMIN_KEY, "If-Match": '"stale"'},  # the admin key wins over the SDK's
        ),
        anthropic.ConflictError,  # the SDK retries a 409 unless told not to
        409,
        "conflict_error",
        r"the channels file changed since you read it .*reload and apply your edit again",
        NEVER,
        messages=False,
    ),
    "413-body-too-large": Case(
        _serving,
        _create(text="x" * 2 * BODY_LIMIT),
        anthropic.RequestTooLargeError,
        413,
        "request_too_large",
        r"^request body exceeds the gateway's limit of .* MB \(MAX_REQUEST_BODY_SIZE_MB\)",
        NEVER,
    ),
    "415-compressed-body": Case(
        _serving,
        _create(extra_headers={"Content-Encoding": "gzip"}),
        anthropic.APIStatusError,  # no class of its own for 415
        415,
        "invalid_request_error",
        r"request bodies must not be compressed \(Content-Encoding: gzip\); send the JSON as it is",
        NEVER,
    ),
    "431-header-too-large": Case(
        _serving,
        _create(extra_headers={"x-padding": "p" * 9000}),
        anthropic.RequestHeaderFieldsTooLargeError,
        431,
        "invalid_request_error",
        r"^request line or header too large \(limit 8190 bytes each\); check the client's headers",
        NEVER,
    ),
    "502-upstream-unreachable": Case(
        _unreachable,
        _create(),
        anthropic.InternalServerError,
        502,
        "api_error",
        r"^upstream channel 'a' is unreachable",
        FREE,
    ),
    "503-no-upstream-answered": Case(
        _all_unreachable,
        _create(),
        anthropic.ServiceUnavailableError,
        503,
        "overloaded_error",
        r"^no upstream could serve model 'claude-sonnet-4-6': a \(127\.0\.0\.1\): .*; b \(127\.0\.0\.1\)",
        AFTER,
        retry_after="5",
    ),
    "504-upstream-silent": Case(
        _silent,
        _create(),
        anthropic.GatewayTimeoutError,
        504,
        "timeout_error",
        r"^upstream channel 'a' timed out",
        FREE,
        hits=1,
    ),
    "529-gateway-at-capacity": Case(
        _at_capacity,
        _create(),
        anthropic.OverloadedError,
        529,
        "overloaded_error",
        r"serving its limit of 1 concurrent requests \(maxConcurrentStreams\); retry shortly",
        AFTER,
        hits=1,  # the request in flight, not this one
        retry_after="1",
    ),
    # Upstream answers, relayed or turned into the gateway's own.
    "400-relayed": Case(
        _relaying(upstream_error(400, "invalid_request_error", "max_tokens: must be at least 1")),
        _create(),
        anthropic.BadRequestError,
        400,
        "invalid_request_error",
        r"^max_tokens: must be at least 1$",
        FREE,  # relayed as it is; the SDK never retries a 400 anyway
        hits=1,
    ),
    "502-upstream-refused-the-channel-key": Case(
        _relaying(upstream_error(401, "authentication_error", "invalid x-api-key")),
        _create(),
        anthropic.InternalServerError,  # 502: not the client's key, and not to retry
        502,
        "api_error",
        r"^upstream channel 'ch0' refused the gateway's key \(401 authentication_error\); "
        r"the gateway's operator must fix the channel's apiKeys -- your own key is fine$",
        NEVER,
        hits=1,
    ),
    "429-relayed-with-retry-after": Case(
        _relaying(
            upstream_error(
                429, "rate_limit_error", "slow down: 50 requests per minute", **{"retry-after": "7"}
            )
        ),
        _create(),
        anthropic.RateLimitError,
        429,
        "rate_limit_error",
        r"^slow down: 50 requests per minute$",
        AFTER,
        hits=1,
        retry_after="7",
    ),
    "429-relayed-without-retry-after": Case(
        _relaying(upstream_error(429, "rate_limit_error", "slow down: 50 requests per minute")),
        _create(),
        anthropic.RateLimitError,
        429,
        "rate_limit_error",
        r"^slow down: 50 requests per minute$",
        AFTER,
        hits=1,
        retry_after="5",  # the cool-down / back-off the gateway applied (5 s defaults)
    ),
    "500-relayed": Case(
        _relaying(upstream_error(500, "api_error", "Internal server error")),
        _create(),
        anthropic.InternalServerError,
        500,
        "api_error",
        r"^Internal server error$",
        FREE,
        hits=1,
    ),
    "529-every-channel-overloaded": Case(
        _relaying(
            upstream_error(529, "overloaded_error", "Overloaded"),
            upstream_error(529, "overloaded_error", "Overloaded"),
        ),
        _create(),
        anthropic.OverloadedError,
        529,
        "overloaded_error",
        r"^Overloaded$",
        AFTER,
        hits=2,
        retry_after="5",  # the cool-down / back-off the gateway applied (5 s defaults)
    ),
    "529-every-channel-streams-an-overloaded-error-first": Case(
        _relaying(OVERLOADED_FIRST, OVERLOADED_FIRST),
        _create(),
        anthropic.OverloadedError,
        529,
        "overloaded_error",
        r"^upstream stream began with an error: Overloaded$",
        AFTER,
        hits=2,
        retry_after="5",  # the cool-down / back-off the gateway applied (5 s defaults)
    ),
}


def check(exc: anthropic.APIStatusError, case: Case) -> None:
    """The class, status, body, type and message; then the retry headers."""
    assert type(exc) is case.error, (type(exc), exc)
    assert exc.status_code == case.status
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == case.error_type == exc.type
    assert exc.response.json() == body
    assert exc.response.headers["content-type"].startswith("application/json")
    message = exc.api_message
    assert isinstance(message, str) and re.search(case.message, message), message
    check_retry_headers(exc.response.headers, case)


def check_retry_headers(headers: Mapping[str, str], case: Case) -> None:
    if case.retry == NEVER:
        assert headers.get("x-should-retry") == "false", dict(headers)
        assert "retry-after" not in headers
    elif case.retry == AFTER:
        assert "x-should-retry" not in headers
        retry_after = headers.get("retry-after")
        assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, dict(headers)
        if case.retry_after is not None:
            assert retry_after == case.retry_after
    else:
        assert "x-should-retry" not in headers and "retry-after" not in headers, dict(headers)


async def raised(env: Env, case: Case, *, stream: bool) -> tuple[anthropic.APIStatusError, Tally]:
    """The error ``case`` raises in the SDK: with max_retries=2 where the answer says no
    retry helps (so the SDK's obedience shows), else with none (no test waits a Retry-After)."""
    gateway = await case.build(env)
    async with sdk(gateway, max_retries=2 if case.retry == NEVER else 0) as (client, tally):
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with asyncio.timeout(5):
                await case.call(client, stream)
    return caught.value, tally


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
async def test_error_reaches_the_sdk_as_anthropic_sends_it(env: Env, case: Case) -> None:
    """Class, status, type, message and retry headers; sent once (x-should-retry: false is
    obeyed where the SDK would retry: the 409 and the 502), and as many upstream hits as due."""
    exc, tally = await raised(env, case, stream=False)
    assert tally.statuses == [case.status]
    if case.hits is not None:
        assert env.hits() == case.hits
    check(exc, case)


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=name) for name, case in CASES.items() if case.messages]
)
async def test_a_streaming_request_gets_the_same_error(env: Env, case: Case) -> None:
    """``stream: true``: the error comes before any event, as the same exception."""
    exc, tally = await raised(env, case, stream=True)
    assert tally.statuses == [case.status]
    check(exc, case)


# --- the SDK's own retries -------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        pytest.param(
            upstream_error(529, "overloaded_error", "Overloaded", **{"retry-after-ms": "10"}),
            anthropic.OverloadedError,
            id="529",
        ),
        pytest.param(
            upstream_error(429, "rate_limit_error", "slow down", **{"retry-after-ms": "10"}),
            anthropic.RateLimitError,
            id="429",
        ),
        pytest.param(
            upstream_error(500, "api_error", "Internal server error", **{"retry-after-ms": "10"}),
            anthropic.InternalServerError,
            id="500",
        ),
    ],
)
async def test_sdk_retries_a_relayed_retryable_error_at_the_pace_it_asks(
    env: Env, reply: Reply, error: type[anthropic.APIStatusError]
) -> None:
    """max_retries=2: three requests, each reaching the upstream (soft state never makes the
    gateway answer in its place), then the last answer raised; retry-after-ms is relayed."""
    gateway = await _relaying(reply)(env)
    async with sdk(gateway, max_retries=2) as (client, tally):
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with asyncio.timeout(5):
                await _create()(client, False)
    assert type(caught.value) is error
    assert caught.value.response.headers["retry-after-ms"] == "10"
    assert tally.statuses == [reply.status] * 3
    (fake,) = env.fakes
    assert [r.header("x-stainless-retry-count") for r in fake.requests] == ["0", "1", "2"]


async def test_sdk_waits_the_retry_after_of_the_gateways_own_529(env: Env) -> None:
    """The gateway's 529 (maxConcurrentStreams) says Retry-After: 1; the SDK waits that second
    (its own backoff would be under 0.5 s), then gets through once the slot is free."""
    gateway = await _at_capacity(env)
    (held,) = env.helds
    async with sdk(gateway, max_retries=1) as (client, tally):
        tally.on_response = lambda status: held.release.set() if status == 529 else None
        async with asyncio.timeout(5):
            message = await _create()(client, False)
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].type == "text" and message.content[0].text == "served"
    assert tally.statuses == [529, 200]
    assert tally.sent[1] - tally.sent[0] >= 0.95
    assert held.hits == 2


async def test_a_stream_that_breaks_off_ends_with_an_error_event_the_sdk_raises(env: Env) -> None:
    """After the 200 head nothing can change the status: the gateway ends the stream with
    an ``error`` event, which the SDK raises (as a plain APIStatusError with the 200)."""
    start = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,'
        b'"usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
    )
    gateway = await _relaying(Reply(chunks=[start]))(env)  # ends before message_stop
    events: list[str] = []
    async with sdk(gateway, max_retries=2) as (client, tally):
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with asyncio.timeout(5):
                stream = await client.messages.create(
                    model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for event in stream:
                    events.append(event.type)
    exc = caught.value
    assert events == ["message_start"]
    assert type(exc) is anthropic.APIStatusError and exc.status_code == 200
    assert exc.type == "api_error"
    assert exc.api_message == (
        "upstream channel 'ch0' closed the stream before message_stop; the response is incomplete"
    )
    assert tally.statuses == [200]  # a broken stream is not retried
