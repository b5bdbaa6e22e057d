"""A built-in Anthropic-compatible upstream for the demo, the tests and the bench.

Answers ``POST {any prefix}/v1/messages`` (SSE in Anthropic's exact event
sequence, or one JSON message), ``POST .../v1/messages/count_tokens`` and
``GET .../v1/models``, and checks its own upstream key.

Request headers tune it (for tests and benchmarks): ``x-mock-deltas`` (number
of text deltas), ``x-mock-delta-bytes`` (text per delta) and
``x-mock-delay-ms`` (pause before each delta).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from aiohttp import web

from .errors import JSON_CONTENT_TYPE, error_body
from .headers import client_key

DEFAULT_KEY = "mock-upstream-key"
DEFAULT_PORT = 3001
MODELS = ("mock-opus", "mock-sonnet", "mock-haiku")
_MAX_DELTAS = 100_000
_ids = itertools.count(1)


def _error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(error_type, message), content_type=JSON_CONTENT_TYPE)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _int_header(request: web.Request, name: str, default: int, upper: int) -> int:
    raw = request.headers.get(name)
    if raw is None or not raw.isdigit():
        return default
    return min(int(raw), upper)


def _said(messages: list[Any]) -> str:
    """The text of the last user message that a person typed: its last text block that is not
    a ``<system-reminder>`` (Claude Code ends user messages with those)."""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role", "user") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            blocks = [content]
        elif isinstance(content, list):
            blocks = [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
        else:
            continue
        texts = [t for t in blocks if not t.lstrip().startswith("<system-reminder>")]
        if texts:
            return texts[-1]
    return ""


def _reply_text(model: str, messages: list[Any]) -> str:
    said = " ".join(_said(messages).split())[:200]
    return f"Hello from the ccx-proxy mock upstream ({model}). You said: {said}"


def _pieces(text: str, request: web.Request) -> list[str]:
    deltas = _int_header(request, "x-mock-deltas", 0, _MAX_DELTAS)
    if not deltas:
        words = text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]
    size = _int_header(request, "x-mock-delta-bytes", 16, 65536)
    filler = (text + " ") * (size // (len(text) + 1) + 1)
    return [filler[:size] for _ in range(deltas)]


class MockUpstream:
    def __init__(self, api_key: str = DEFAULT_KEY) -> None:
        self.api_key = api_key

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if client_key(request.headers) != self.api_key:
            return _error(401, "authentication_error", "mock upstream: invalid x-api-key")
        if request.method == "POST" and path.endswith("/messages/count_tokens"):
            return await self.count_tokens(request)
        if request.method == "POST" and path.endswith("/messages"):
            return await self.messages(request)
        if request.method == "GET" and path.endswith("/models"):
            return self.models()
        return _error(404, "not_found_error", f"mock upstream: no route for {request.method} {path}")

    async def _json(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "invalid_request_error", "mock upstream: body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_error", "mock upstream: model: field required")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "invalid_request_error", "mock upstream: messages: field required")
        return body

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        tokens = max(1, len(orjson.dumps(body["messages"])) // 4)
        return web.json_response({"input_tokens": tokens}, dumps=lambda o: orjson.dumps(o).decode())

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _error(
                400, "invalid_request_error", "mock upstream: max_tokens: must be a positive integer"
            )
        model = body["model"]
        text = _reply_text(model, body["messages"])
        pieces = _pieces(text, request)
        message_id = f"msg_mock_{next(_ids):08d}"
        input_tokens = max(1, len(orjson.dumps(body["messages"])) // 4)
        usage_out = len(pieces)
        headers = {"request-id": f"req_mock_{message_id[9:]}"}
        if not body.get("stream"):
            message = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": usage_out},
            }
            return web.Response(body=orjson.dumps(message), content_type=JSON_CONTENT_TYPE, headers=headers)

        delay = _int_header(request, "x-mock-delay-ms", 0, 60_000) / 1000
        head = _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        )
        head += _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        head += _event("ping", {"type": "ping"})
        deltas = [
            _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
            )
            for p in pieces
        ]
        tail = _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        tail += _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage_out},
            },
        )
        tail += _event("message_stop", {"type": "message_stop"})

        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        if not delay:
            await response.write(b"".join((head, *deltas, tail)))
        else:
            await response.write(head)
            for event in deltas:
                await asyncio.sleep(delay)
                await response.write(event)
            await response.write(tail)
        await response.write_eof()
        return response

    def models(self) -> web.Response:
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"}
            for m in MODELS
        ]
        page = {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
        return web.Response(body=orjson.dumps(page), content_type=JSON_CONTENT_TYPE)
