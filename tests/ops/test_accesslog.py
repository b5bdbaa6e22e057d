"""The access log: one line per request, whatever became of it, no secret in it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccx_proxy.forwarded import TrustedProxies
from ccx_proxy.ops.accesslog import REQUEST_ID_HEADER, JsonFormatter
from ccx_proxy.state import GATEWAY
from ccx_proxy.team import members
from tests.conftest import ACCESS_KEY, AUTH, UPSTREAM_KEY, Reply, channel, make_settings, message_body
from tests.team.test_meter import STREAM

REPO = Path(__file__).resolve().parents[2]


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


async def test_behind_a_trusted_balancer_the_client_is_the_forwarded_address(
    start_gateway, fake_upstream, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    client = await start_gateway(
        channel("up", fake_upstream.url),
        settings=make_settings(forwarded_allow_ips=TrustedProxies.parse("127.0.0.1")),
    )
    spoofed_then_seen = {**AUTH, "X-Forwarded-For": "192.0.2.1, 203.0.113.7"}
    assert (await client.post("/v1/messages", data=message_body(), headers=spoofed_then_seen)).status == 200
    assert (await client.get("/health")).status == 200  # no header: the peer
    first, second = (r.access for r in _lines(caplog))  # type: ignore[attr-defined]
    assert (first["client"], first["proxy"]) == ("203.0.113.7", "127.0.0.1")
    assert _lines(caplog)[0].getMessage().startswith("203.0.113.7 ")  # the text line too
    assert second["client"] == "127.0.0.1" and "proxy" not in second
    assert "x-forwarded-for" not in fake_upstream.requests[0].headers


async def test_without_forwarded_allow_ips_the_header_is_ignored(
    start_gateway, fake_upstream, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    client = await start_gateway(channel("up", fake_upstream.url))
    headers = {**AUTH, "X-Forwarded-For": "203.0.113.7"}
    assert (await client.post("/v1/messages", data=message_body(), headers=headers)).status == 200
    (line,) = _lines(caplog)
    assert line.access["client"] == "127.0.0.1" and "proxy" not in line.access  # type: ignore[attr-defined]


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


@pytest.mark.slow
def test_a_real_process_writes_one_json_line_per_request(tmp_path: Any) -> None:
    """``serve`` with LOG_FORMAT=json: every stderr line parses, one access line per request,
    no configured key anywhere in the output."""
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from tests.conftest import unused_port

    port, mock_port = unused_port(), unused_port()
    key, admin = "json-log-access-key-0123456789", "json-log-admin-key-0123456789"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "ADMIN_", "OTEL_"))}
    env.update(
        PROXY_ACCESS_KEY=key,
        ADMIN_ACCESS_KEY=admin,
        LOG_FORMAT="json",
        DATA_DIR=str(tmp_path / "data"),
        PORT="",
    )
    (tmp_path / "channels.json").write_bytes((REPO / "channels.json").read_bytes())
    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccx_proxy", "serve", "--with-mock-upstream"]
            + ["--port", str(port), "--mock-port", str(mock_port), "--config", "channels.json"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=str(tmp_path),
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(stderr.read_text()[-2000:]) from None
                time.sleep(0.05)

        def post(path: str, api_key: str, model: str = "claude-sonnet-4-5") -> int:
            body = orjson.dumps(
                {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            )
            request = urllib.request.Request(
                base + path, data=body, headers={"x-api-key": api_key, "content-type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                exc.read()
                return int(exc.code)

        statuses = [
            post("/v1/messages", key),
            post("/v1/messages", "wrong-key-0000000000"),
            post("/v1/v1/messages", key),
            post("/v1/messages", key, model="claude-opus-4-8"),
        ]
        assert statuses[:3] == [200, 401, 400]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = stderr.read_text()
    docs = [orjson.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    access = [d for d in docs if d["logger"] == "ccx_proxy.access" and d["path"] != "/health"]
    assert [d["status"] for d in access] == statuses
    assert [d["path"] for d in access] == ["/v1/messages", "/v1/messages", "/v1/v1/messages", "/v1/messages"]
    assert access[0]["member"] == "shared" and access[0]["channel"] == "demo-mock"
    assert all(d["request_id"] and d["time"].endswith("Z") for d in access)
    assert key not in text and admin not in text and "mock-upstream-key" not in text
