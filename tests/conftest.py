"""Shared fixtures: a scripted fake upstream and a gateway in front of it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ccx_proxy.app import create_app
from ccx_proxy.config import GatewayConfig, parse_config
from ccx_proxy.health import Clock
from ccx_proxy.server import install, server_kwargs
from ccx_proxy.settings import Settings

ACCESS_KEY = "test-access-key-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-key-9876wxyz"

SSE_BODY = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"m"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"h\xc3\xa9llo \xe2\x82\xac"}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@dataclass
class Recorded:
    method: str
    path: str
    query_string: str
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Reply:
    """What the fake upstream answers: chunks written one by one, with optional pauses."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    chunks: list[bytes] = field(default_factory=lambda: [SSE_BODY])
    delay: float = 0.0
    # Awaited before each chunk after the first: lets a test hold the upstream mid-stream.
    gate: Callable[[int], Awaitable[None]] | None = None
    # Drop the connection after the last chunk instead of ending the body properly.
    cut: bool = False
    # Pause before sending the response headers.
    before: float = 0.0


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.aborted = 0  # responses the gateway walked away from mid-way
        self.completed = 0
        self.sent = 0  # body bytes written (each write returned: the transport took them)
        self.reply: Reply | Callable[[Recorded], Reply] = Reply()
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        recorded = Recorded(request.method, request.path, request.query_string, headers, await request.read())
        self.requests.append(recorded)
        reply = self.reply(recorded) if callable(self.reply) else self.reply
        try:
            if reply.before:
                await asyncio.sleep(reply.before)
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            if "Content-Length" not in reply.headers:
                response.enable_chunked_encoding()
            await response.prepare(request)
            for i, chunk in enumerate(reply.chunks):
                if i and reply.gate is not None:
                    await reply.gate(i)
                if i and reply.delay:
                    await asyncio.sleep(reply.delay)
                await response.write(chunk)
                self.sent += len(chunk)
            if reply.cut:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.aborted += 1
            raise
        self.completed += 1
        return response


def unused_port() -> int:
    """A loopback port nothing listens on (free when this returns; tests bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def channel(name: str = "up", base_url: str = "http://127.0.0.1:1", **fields: Any) -> dict[str, Any]:
    return {"name": name, "baseUrl": base_url, "apiKeys": [UPSTREAM_KEY], **fields}


def make_config(*channels: dict[str, Any], env: dict[str, str] | None = None, **top: Any) -> GatewayConfig:
    return parse_config({"channels": list(channels), **top}, env or {})


def make_settings(**overrides: Any) -> Settings:
    return Settings(access_keys=overrides.pop("access_keys", (ACCESS_KEY,)), **overrides)


AUTH = {"x-api-key": ACCESS_KEY}


@pytest.fixture
def make_upstream(aiohttp_server: Any) -> Callable[[], Awaitable[FakeUpstream]]:
    async def make() -> FakeUpstream:
        fake = FakeUpstream()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        fake.server = await aiohttp_server(app)
        return fake

    return make


@pytest.fixture
async def fake_upstream(make_upstream: Callable[[], Awaitable[FakeUpstream]]) -> FakeUpstream:
    return await make_upstream()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def start_gateway(aiohttp_client: Any) -> GatewayFactory:
    async def start(
        *channels: dict[str, Any],
        settings: Settings | None = None,
        clock: Clock | None = None,
        **top: Any,
    ) -> TestClient[Any, Any]:
        settings = settings or make_settings()
        app = create_app(settings, make_config(*channels, **top), clock)
        client: TestClient[Any, Any] = await aiohttp_client(app, server_kwargs=server_kwargs(settings))
        server = client.server.runner.server
        assert server is not None
        install(server, settings)  # the gateway's own client-side handler
        return client

    return start


@pytest.fixture
async def gateway(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> TestClient[Any, Any]:
    """A gateway with one channel pointing at the fake upstream."""
    return await start_gateway(
        channel("up", fake_upstream.url, modelMapping={"opus": "up-opus", "sonnet": "up-sonnet"})
    )


def message_body(model: str = "claude-sonnet-4-5", stream: bool = True, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "max_tokens": 64,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
            **extra,
        }
    )


def assert_anthropic_error(status: int, body: bytes, error_type: str) -> str:
    data = orjson.loads(body)
    assert data["type"] == "error", data
    assert data["error"]["type"] == error_type, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    assert set(data) == {"type", "error"} and set(data["error"]) == {"type", "message"}
    return str(data["error"]["message"])
