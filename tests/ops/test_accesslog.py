"""The access log: one line per request, whatever became of it, no secret in it."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from ccx_proxy.ops.accesslog import REQUEST_ID_HEADER, JsonFormatter
from ccx_proxy.state import GATEWAY
from ccx_proxy.team import members
from tests.conftest import ACCESS_KEY, AUTH, UPSTREAM_KEY, Reply, channel, make_settings, message_body
from tests.team.test_meter import STREAM


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ccx_proxy.access"]


async def test_one_line_per_request_with_its_fields(start_gateway, make_upstream, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    a, b = await make_upstream(), await make_upstream()
    a.reply = Reply(
        status=429, headers={"Content-Type": "application/json", "retry-after": "3"}, chunks=[b"{}"]
    )
    b.reply = Reply(chunks=[STREAM])
    client = await start_gateway(
        channel("a", a.url, priority=1, supportedModels=["claude-*"]),
        channel("b", b.url, priority=2, supportedModels=["claude-*"], modelMapping={"sonnet": "b-sonnet"}),
        settings=make_settings(data_dir=str(tmp_path)),
    )
    team = client.server.app[GATEWAY].team
    _, member_key = await team.db.run(lambda conn: members.add(conn, "alice"))
    await team.refresh(force=True)

    ok = await client.post(
        "/v1/messages",
        data=message_body("claude-sonnet-4-5"),
        headers={"x-api-key": member_key, "X-Claude-Code-Session-Id": "sess-9"},
    )
    assert ok.status == 200 and await ok.read() == STREAM
    wrong_key = await client.post(
        "/v1/messages", data=message_body(), headers={"x-api-key": "nope-" + "x" * 30}
    )
    wrong_path = await client.post("/v1/v1/messages", data=message_body(), headers=AUTH)
    no_model = await client.post("/v1/messages", data=message_body("gpt-5"), headers=AUTH)
    assert (wrong_key.status, wrong_path.status, no_model.status) == (401, 400, 400)

    lines = _lines(caplog)
    assert len(lines) == 4
    first = lines[0].access  # type: ignore[attr-defined]
    assert first["request_id"] == ok.headers[REQUEST_ID_HEADER]
    assert {k: first[k] for k in ("method", "path", "status", "member", "session", "channel")} == {
        "method": "POST",
        "path": "/v1/messages",
        "status": 200,
        "member": "alice",
        "session": "sess-9",
        "channel": "b",
    }
    assert (first["model"], first["upstream_model"], first["attempts"]) == (
        "claude-sonnet-4-5",
        "b-sonnet",
        2,
    )
    assert first["tokens"] == {
        "input": 12,
        "output": 87,
        "cache_write_5m": 300,
        "cache_write_1h": 400,
        "cache_read": 5000,
    }
    assert first["ttfb_ms"] > 0 and first["duration_ms"] >= first["ttfb_ms"] and "error_type" not in first
    text = lines[0].getMessage()
    assert (
        '"POST /v1/messages" 200 member=alice channel=b model=claude-sonnet-4-5->b-sonnet attempts=2' in text
    )
    assert "tokens=in:12,out:87,cw5m:300,cw1h:400,cr:5000" in text

    unauthenticated, misdirected, refused = (r.access for r in lines[1:])  # type: ignore[attr-defined]
    assert (unauthenticated["status"], "member" not in unauthenticated) == (401, True)
    assert unauthenticated["request_id"] == wrong_key.headers[REQUEST_ID_HEADER]
    assert (misdirected["path"], misdirected["status"]) == ("/v1/v1/messages", 400)
    assert (refused["status"], refused["error_type"], refused["member"]) == (
        400,
        "invalid_request_error",
        "shared",
    )
    every = "\n".join(r.getMessage() for r in lines) + "".join(str(r.access) for r in lines)  # type: ignore[attr-defined]
    for secret in (ACCESS_KEY, UPSTREAM_KEY, member_key):
        assert secret not in every
    assert len({r.access["request_id"] for r in lines}) == 4  # type: ignore[attr-defined]


async def test_a_path_holding_a_key_is_masked(start_gateway, fake_upstream, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    client = await start_gateway(channel("up", fake_upstream.url))
    from ccx_proxy import redact

    redact.REDACTOR.set_keys((ACCESS_KEY,))
    try:
        resp = await client.get(f"/{ACCESS_KEY}/v1/models")
        assert resp.status in (400, 404)
    finally:
        redact.REDACTOR.set_keys(())
    (line,) = _lines(caplog)
    assert ACCESS_KEY not in line.access["path"]  # type: ignore[attr-defined]


async def test_access_log_off(start_gateway, fake_upstream, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    client = await start_gateway(channel("up", fake_upstream.url), settings=make_settings(access_log=False))
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 200 and resp.headers[REQUEST_ID_HEADER]  # the id stays
    assert _lines(caplog) == []


def test_json_formatter_puts_the_fields_at_the_top() -> None:
    fields: dict[str, Any] = {"request_id": "abc", "status": 200, "path": "/v1/messages"}
    record = logging.LogRecord("ccx_proxy.access", logging.INFO, __file__, 1, "%s", ("x",), None)
    record.access = fields
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["request_id"] == "abc" and doc["level"] == "INFO" and doc["logger"] == "ccx_proxy.access"
    assert doc["time"].endswith("Z")
    plain = logging.LogRecord("ccx_proxy", logging.WARNING, __file__, 1, "channel %s down", ("a",), None)
    assert orjson.loads(JsonFormatter().format(plain))["message"] == "channel a down"


def test_refusals_without_a_member_are_budgeted(caplog: pytest.LogCaptureFixture) -> None:
    from ccx_proxy.ops.accesslog import _Budget

    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    budget = _Budget(burst=3, window=10.0)
    allowed = [budget.allow(100.0 + i * 0.01) for i in range(10)]
    assert allowed == [True] * 3 + [False] * 7
    assert budget.allow(111.0)  # a new window: the count of the last one is logged
    assert "... and 7 more refused requests without a member in the last 10 s (not logged)" in caplog.text
