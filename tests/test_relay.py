"""The /v1/messages relay, end to end, at the byte level."""

import asyncio
import gzip
from typing import Any

import orjson
import pytest

from tests.conftest import (
    AUTH,
    SSE_BODY,
    UPSTREAM_KEY,
    FakeUpstream,
    Reply,
    channel,
    message_body,
)


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


FAST_TIMEOUTS = {"connectTimeoutMs": 2000, "responseHeaderTimeoutMs": 300, "streamInactivityTimeoutMs": 300}
EURO = SSE_BODY.index("€".encode())
BLANK = SSE_BODY.index(b"\n\n")


@pytest.mark.parametrize(
    "cuts",
    [
        pytest.param([], id="one-chunk"),
        pytest.param([EURO + 1, EURO + 2], id="inside-utf8-char"),
        pytest.param([BLANK + 1], id="inside-blank-line"),
        pytest.param([7, 8, 9, 10, 20, 21], id="inside-field-names"),
        pytest.param(list(range(1, len(SSE_BODY))), id="byte-by-byte"),
    ],
)
async def test_stream_is_byte_exact_for_awkward_chunk_splits(
    gateway, fake_upstream: FakeUpstream, cuts
) -> None:
    fake_upstream.reply = Reply(chunks=_splits(SSE_BODY, cuts))
    resp = await gateway.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 200
    assert await resp.read() == SSE_BODY
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no"


async def test_each_chunk_reaches_the_client_before_the_upstream_sends_the_next(
    gateway, fake_upstream: FakeUpstream
) -> None:
    chunks = [b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n", b"event: message_stop\ndata: {}\n\n"]
    released = [asyncio.Event() for _ in chunks]

    async def gate(i: int) -> None:
        await released[i].wait()

    fake_upstream.reply = Reply(chunks=chunks, gate=gate)
    resp = await gateway.post("/v1/messages", data=message_body(), headers=AUTH)
    received = b""
    for i in range(len(chunks)):
        if i:
            released[i].set()
        while len(received) < sum(map(len, chunks[: i + 1])):
            received += await asyncio.wait_for(resp.content.readany(), 5)
        # The upstream is still held on the next chunk: nothing was buffered.
        assert received == b"".join(chunks[: i + 1])
    assert await resp.content.read() == b""


async def test_non_stream_json_and_headers_come_back_unchanged(gateway, fake_upstream: FakeUpstream) -> None:
    body = b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"x"}],  "z": 1.50}'
    fake_upstream.reply = Reply(
        headers={
            "Content-Type": "application/json",
            "request-id": "req_42",
            "anthropic-ratelimit-tokens-remaining": "999",
            "Content-Length": str(len(body)),
        },
        chunks=[body],
    )
    resp = await gateway.post("/v1/messages", data=message_body(stream=False), headers=AUTH)
    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["request-id"] == "req_42"
    assert resp.headers["anthropic-ratelimit-tokens-remaining"] == "999"
    assert "X-Accel-Buffering" not in resp.headers


@pytest.mark.parametrize("status", [400, 404, 413, 422, 429, 500, 529])
async def test_upstream_errors_pass_through_unchanged(
    gateway, fake_upstream: FakeUpstream, status: int
) -> None:
    body = b'{"type":"error","error":{"type":"whatever_error","message":"from upstream"}}'
    fake_upstream.reply = Reply(
        status=status, headers={"Content-Type": "application/json", "retry-after": "7"}, chunks=[body]
    )
    resp = await gateway.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == status
    assert await resp.read() == body
    assert resp.headers["retry-after"] == "7"


async def test_upstreams_are_asked_for_identity_encoding(gateway, fake_upstream: FakeUpstream) -> None:
    resp = await gateway.post(
        "/v1/messages", data=message_body(), headers={**AUTH, "Accept-Encoding": "gzip, br"}
    )
    assert resp.status == 200
    assert fake_upstream.requests[-1].headers["accept-encoding"] == ["identity"]


async def test_compressed_upstream_bytes_are_relayed_undecoded(
    start_gateway, fake_upstream: FakeUpstream
) -> None:
    gateway = await start_gateway(channel("up", fake_upstream.url, forwardAcceptEncoding=True))
    payload = gzip.compress(b'{"id":"msg_1"}')
    fake_upstream.reply = Reply(
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, chunks=[payload]
    )
    resp = await gateway.post(
        "/v1/messages",
        data=message_body(stream=False),
        headers={**AUTH, "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.read() == payload
    assert fake_upstream.requests[-1].header("accept-encoding") == "gzip"


async def test_model_is_rewritten_only_when_the_mapping_changes_it(
    gateway, fake_upstream: FakeUpstream
) -> None:
    mapped = message_body("claude-opus-4-1")
    await (await gateway.post("/v1/messages", data=mapped, headers=AUTH)).read()
    assert fake_upstream.requests[-1].body == mapped.replace(b'"claude-opus-4-1"', b'"up-opus"')

    unmapped = b'{"model":"gpt-x","max_tokens":1,\n "messages":[{"role":"user","content":"opus"}]}'
    await (await gateway.post("/v1/messages", data=unmapped, headers=AUTH)).read()
    assert fake_upstream.requests[-1].body == unmapped


async def test_request_headers_pass_through_and_credentials_are_replaced(
    gateway, fake_upstream: FakeUpstream
) -> None:
    client_headers = {
        **AUTH,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
        "User-Agent": "claude-cli/2.0.0 (external, cli)",
        "X-Stainless-Lang": "js",
        "X-Stainless-Retry-Count": "0",
        "X-Claude-Code-Session-Id": "0b8e-session",
        "X-App": "cli",
        "Authorization": "Bearer also-client-secret",
    }
    await (await gateway.post("/v1/messages", data=message_body(), headers=client_headers)).read()
    seen = fake_upstream.requests[-1]
    for name in (
        "anthropic-version",
        "anthropic-beta",
        "User-Agent",
        "X-Stainless-Lang",
        "X-Stainless-Retry-Count",
        "X-Claude-Code-Session-Id",
        "X-App",
    ):
        assert seen.header(name) == client_headers[name], name
    assert seen.headers["x-api-key"] == [UPSTREAM_KEY]
    assert "authorization" not in seen.headers
    # Host names the upstream (from the channel's baseUrl), never the gateway the client called.
    assert seen.header("host") == fake_upstream.url.removeprefix("http://").rstrip("/")
    assert int(seen.header("content-length") or 0) == len(seen.body)
    for value in (v for vs in seen.headers.values() for v in vs):
        assert "client-secret" not in value and AUTH["x-api-key"] not in value


async def test_bearer_channels_and_custom_headers(start_gateway, fake_upstream: FakeUpstream) -> None:
    client = await start_gateway(
        channel("b", fake_upstream.url, authHeader="bearer", customHeaders={"X-Org": "team-1"})
    )
    await (await client.post("/v1/messages", data=message_body(), headers=AUTH)).read()
    seen = fake_upstream.requests[-1]
    assert seen.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert "x-api-key" not in seen.headers
    assert seen.header("x-org") == "team-1"


async def test_no_default_user_agent_or_encoding_is_invented(gateway, fake_upstream: FakeUpstream) -> None:
    await (
        await gateway.post(
            "/v1/messages",
            data=message_body(),
            headers=AUTH,
            skip_auto_headers=["User-Agent", "Accept-Encoding", "Accept"],
        )
    ).read()
    seen = fake_upstream.requests[-1]
    assert "user-agent" not in seen.headers
    assert seen.headers["accept-encoding"] == ["identity"]  # the channel's, not invented by a library


@pytest.mark.parametrize(
    "base_suffix, gateway_path, upstream_path",
    [
        pytest.param("", "/v1/messages?beta=true", "/v1/messages", id="root"),
        pytest.param("/anthropic", "/v1/messages?beta=true", "/anthropic/v1/messages", id="prefix"),
        pytest.param(
            "/coding/",
            "/v1/messages/count_tokens?beta=true",
            "/coding/v1/messages/count_tokens",
            id="prefix-slash-count-tokens",
        ),
        pytest.param("/raw/path#", "/v1/messages?beta=true", "/raw/path/messages", id="hash-verbatim"),
    ],
)
async def test_upstream_url_and_query_string(
    start_gateway, fake_upstream: FakeUpstream, base_suffix: str, gateway_path: str, upstream_path: str
) -> None:
    client = await start_gateway(channel("c", fake_upstream.url + base_suffix))
    resp = await client.post(gateway_path, data=message_body(), headers=AUTH)
    await resp.read()
    seen = fake_upstream.requests[-1]
    assert (seen.method, seen.path, seen.query_string) == ("POST", upstream_path, "beta=true")


async def test_priority_picks_the_channel_and_allowlist_filters(start_gateway, aiohttp_server) -> None:
    from aiohttp import web

    hits: list[str] = []

    def upstream(name: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            hits.append(f"{name}:{orjson.loads(await request.read())['model']}")
            return web.json_response({"ok": name})

        app = web.Application()
        app.router.add_post("/v1/messages", handle)
        return app

    first = await aiohttp_server(upstream("first"))
    second = await aiohttp_server(upstream("second"))
    client = await start_gateway(
        channel("second", str(second.make_url("")), priority=2, modelMapping={"haiku": "s-haiku"}),
        channel(
            "first",
            str(first.make_url("")),
            priority=1,
            supportedModels=["*opus*"],
            modelMapping={"opus": "f-opus"},
        ),
    )
    for model in ("claude-opus-4", "claude-haiku-4"):
        await (await client.post("/v1/messages", data=message_body(model), headers=AUTH)).read()
    assert hits == ["first:f-opus", "second:s-haiku"]


async def test_upstream_cut_mid_stream_ends_with_an_sse_error_event(
    gateway, fake_upstream: FakeUpstream
) -> None:
    part = SSE_BODY[: SSE_BODY.index(b"\n\n") + 2 + 60]  # the first event, then 60 bytes of the next
    fake_upstream.reply = Reply(chunks=[part], cut=True)
    resp = await gateway.post("/v1/messages", data=message_body(), headers=AUTH)
    data = await resp.read()
    assert data.startswith(part)
    # The half-written event is closed with a blank line, then a complete error event.
    tail = data[len(part) :]
    assert tail.startswith(b"\n\nevent: error\ndata: ") and tail.endswith(b"\n\n")
    error = orjson.loads(tail[len(b"\n\nevent: error\ndata: ") :])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "'up'" in error["error"]["message"] and UPSTREAM_KEY not in error["error"]["message"]


async def test_upstream_silent_before_headers_is_504(start_gateway, aiohttp_server) -> None:
    from aiohttp import web

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/messages", hang)
    server = await aiohttp_server(app)
    client = await start_gateway(channel("sleepy", str(server.make_url(""))), **FAST_TIMEOUTS)
    resp = await asyncio.wait_for(client.post("/v1/messages", data=message_body(), headers=AUTH), 10)
    assert resp.status == 504
    body = orjson.loads(await resp.read())
    assert body["error"]["type"] == "timeout_error" and "'sleepy'" in body["error"]["message"]


async def test_upstream_stall_mid_stream_ends_with_an_sse_error_event(start_gateway, fake_upstream) -> None:
    stall = asyncio.Event()

    async def gate(i: int) -> None:
        await stall.wait()  # never set: the upstream goes quiet after the first chunk

    first = b"event: message_start\ndata: {}\n\n"
    fake_upstream.reply = Reply(chunks=[first, b"never sent"], gate=gate)
    client = await start_gateway(channel("up", fake_upstream.url), **FAST_TIMEOUTS)
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    data = await asyncio.wait_for(resp.read(), 10)
    assert data.startswith(first + b"event: error\ndata: ")
    assert b"stalled" in data and data.endswith(b"\n\n")
    stall.set()
