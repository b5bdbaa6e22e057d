"""Tracing: spans and GenAI attributes, checked with the SDK's in-memory exporter."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")  # the "otel" extra (the test extra installs it)

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from ccx_proxy.ops import tracing  # noqa: E402
from ccx_proxy.state import GATEWAY  # noqa: E402
from tests.conftest import AUTH, UPSTREAM_KEY, Reply, channel, make_settings, message_body  # noqa: E402
from tests.team.test_meter import STREAM  # noqa: E402


async def _traced(
    start_gateway: Any, *channels: dict[str, Any], **kw: Any
) -> tuple[Any, InMemorySpanExporter]:
    client = await start_gateway(*channels, **kw)
    exporter = InMemorySpanExporter()
    tracing.setup(client.server.app, client.server.app[GATEWAY], exporter)
    return client, exporter


async def test_a_request_span_with_an_attempt_per_upstream_try(
    start_gateway, make_upstream, tmp_path
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.reply = Reply(status=529, headers={"Content-Type": "application/json"}, chunks=[b'{"type":"error"}'])
    b.reply = Reply(chunks=[STREAM])
    client, exporter = await _traced(
        start_gateway,
        channel("a", a.url, priority=1),
        channel("b", b.url, priority=2, modelMapping={"sonnet": "b-sonnet"}),
        settings=make_settings(data_dir=str(tmp_path)),
    )
    resp = await client.post(
        "/v1/messages",
        data=message_body("claude-sonnet-4-5"),
        headers={**AUTH, "X-Claude-Code-Session-Id": "s-1"},
    )
    assert resp.status == 200 and await resp.read() == STREAM
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.kind == SpanKind.SERVER]
    attempts = sorted((s for s in spans if s.kind == SpanKind.CLIENT), key=lambda s: s.start_time)
    assert root.name == "chat claude-sonnet-4-5"
    attrs = dict(root.attributes or {})
    assert {k: attrs[k] for k in (
        "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.conversation.id",
        "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
        "ccx.channel", "ccx.attempts", "http.response.status_code",
    )} == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.response.model": "b-sonnet",
        "gen_ai.conversation.id": "s-1",
        "gen_ai.usage.input_tokens": 12 + 300 + 400 + 5000,  # the conventions count cache tokens in
        "gen_ai.usage.output_tokens": 87,
        "gen_ai.usage.cache_read.input_tokens": 5000,
        "gen_ai.usage.cache_creation.input_tokens": 700,
        "ccx.channel": "b",
        "ccx.attempts": 2,
        "http.response.status_code": 200,
    }  # fmt: skip
    assert attrs["ccx.request_id"] == resp.headers["x-ccx-request-id"]
    assert root.status.status_code != StatusCode.ERROR
    assert [s.name for s in attempts] == ["attempt a", "attempt b"]
    failed, served = attempts
    assert failed.parent is not None and failed.parent.span_id == root.context.span_id
    assert dict(failed.attributes or {})["error.type"] == "529"
    assert failed.status.status_code == StatusCode.ERROR and UPSTREAM_KEY not in (
        failed.status.description or ""
    )
    assert dict(served.attributes or {})["server.address"] == "127.0.0.1"
    assert root.start_time <= failed.start_time <= failed.end_time <= served.start_time <= root.end_time


async def test_an_error_request_is_an_error_span(start_gateway, fake_upstream) -> None:
    client, exporter = await _traced(
        start_gateway, channel("up", fake_upstream.url, supportedModels=["claude-*"])
    )
    assert (await client.post("/v1/messages", data=message_body("gpt-5"), headers=AUTH)).status == 400
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "invalid_request_error"


async def test_off_without_an_endpoint(start_gateway, fake_upstream, monkeypatch) -> None:
    for name in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    client = await start_gateway(channel("up", fake_upstream.url))
    assert client.server.app[GATEWAY].team.tracer is None
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 200


async def test_spans_go_out_over_otlp_http(start_gateway, fake_upstream, aiohttp_server, monkeypatch) -> None:
    import asyncio

    from aiohttp import web

    received: list[tuple[str, str, int]] = []

    async def traces(request: web.Request) -> web.Response:
        received.append((request.path, request.content_type, len(await request.read())))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    collector = await aiohttp_server(app)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", str(collector.make_url("")).rstrip("/"))
    client = await start_gateway(channel("up", fake_upstream.url))
    tracer = client.server.app[GATEWAY].team.tracer
    assert tracer is not None
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 200
    assert await asyncio.to_thread(tracer.provider.force_flush, 5000)
    assert received and received[0][:2] == ("/v1/traces", "application/x-protobuf") and received[0][2] > 0
    await asyncio.to_thread(tracer.provider.shutdown)
