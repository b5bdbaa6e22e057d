"""Members, usage and limits end to end: a gateway with a database, a fake upstream whose
answers carry known usage, records checked to the token and the cent.  Every test runs on
SQLite and on PostgreSQL (tests/team/conftest.py), but for the few that take the SQLite file
itself apart: their PostgreSQL counterparts are in test_postgres.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccx_proxy.state import GATEWAY
from ccx_proxy.team import members
from ccx_proxy.team.members import Limits
from tests.conftest import AUTH, Reply, channel, make_settings, message_body
from tests.team.test_meter import DELTA, START, STREAM, sse

pytestmark = [pytest.mark.backends("sqlite", "postgresql"), pytest.mark.usefixtures("backend")]

PRICES = {"up-sonnet": {"input": 3, "output": 15, "cacheWrite5m": 3.75, "cacheWrite1h": 6, "cacheRead": 0.3}}
# 12 input, 87 output, 300 5m writes, 400 1h writes, 5000 reads at the PRICES above:
COST = (12 * 3 + 87 * 15 + 300 * 3.75 + 400 * 6 + 5000 * 0.3) / 1e6
TOKENS = 12 + 87 + 300 + 400 + 5000


async def _gateway(start_gateway: Any, upstream: Any, tmp_path: Path, **settings: Any) -> Any:
    client = await start_gateway(
        channel("up", upstream.url, modelMapping={"sonnet": "up-sonnet"}, supportedModels=["claude-*"]),
        settings=make_settings(data_dir=str(tmp_path), **settings),
        prices=PRICES,
    )
    return client


def _team(client: Any) -> Any:
    return client.server.app[GATEWAY].team


async def _member(client: Any, name: str, **kwargs: Any) -> str:
    team = _team(client)
    _, key = await team.db.run(lambda conn: members.add(conn, name, **kwargs))
    await team.refresh(force=True)
    return str(key)


async def _rows(client: Any) -> list[dict[str, Any]]:
    team = _team(client)
    await team.recorder.flush()

    def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        cursor = conn.execute("SELECT * FROM usage ORDER BY id")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    rows: list[dict[str, Any]] = await team.db.run(read)
    return rows


async def test_a_streamed_request_is_recorded_to_the_token_and_cent(
    start_gateway, fake_upstream, tmp_path
) -> None:
    fake_upstream.reply = Reply(chunks=[STREAM[:40], STREAM[40:333], STREAM[333:]])
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    key = await _member(client, "alice")
    headers = {"x-api-key": key, "X-Claude-Code-Session-Id": "sess-1"}
    resp = await client.post("/v1/messages", data=message_body("claude-sonnet-4-5"), headers=headers)
    assert resp.status == 200 and await resp.read() == STREAM  # not a byte changed
    (row,) = await _rows(client)
    assert {k: row[k] for k in ("member", "session", "endpoint", "channel", "model", "upstream_model")} == {
        "member": "alice",
        "session": "sess-1",
        "endpoint": "messages",
        "channel": "up",
        "model": "claude-sonnet-4-5",
        "upstream_model": "up-sonnet",
    }
    assert (row["stream"], row["status"], row["outcome"], row["attempts"], row["error_type"]) == (
        1,
        200,
        "complete",
        1,
        None,
    )
    tokens = ("input_tokens", "output_tokens", "cache_write_5m", "cache_write_1h", "cache_read")
    assert tuple(row[k] for k in tokens) == (12, 87, 300, 400, 5000)
    assert round(row["cost_usd"], 6) == round(COST, 6) and round(COST, 2) == 0.01
    assert row["key_id"] == "sk-…wxyz" and row["ttfb_ms"] > 0 and row["duration_ms"] >= row["ttfb_ms"]
    assert len(row["request_id"]) == 16
    spent = _team(client).limiter.spent("alice")
    assert (spent.day_tokens, round(spent.day_usd, 6)) == (TOKENS, round(COST, 6))


async def test_a_json_answer_is_recorded(start_gateway, fake_upstream, tmp_path) -> None:
    message = {**START["message"], "usage": {**START["message"]["usage"], "output_tokens": 87}}  # type: ignore[dict-item]
    fake_upstream.reply = Reply(headers={"Content-Type": "application/json"}, chunks=[orjson.dumps(message)])
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    resp = await client.post("/v1/messages", data=message_body(stream=False), headers=AUTH)
    assert resp.status == 200
    (row,) = await _rows(client)
    assert row["member"] == "shared" and row["stream"] == 0
    assert (row["input_tokens"], row["output_tokens"], row["cache_read"]) == (12, 87, 5000)
    assert round(row["cost_usd"], 6) == round(COST, 6)


async def test_a_cut_upstream_is_recorded_with_what_was_seen(start_gateway, fake_upstream, tmp_path) -> None:
    fake_upstream.reply = Reply(chunks=[sse(START)], cut=True)
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert b"event: error" in await resp.read()
    (row,) = await _rows(client)
    assert (row["status"], row["outcome"], row["input_tokens"], row["output_tokens"]) == (
        200,
        "upstream_cut",
        12,
        1,
    )


async def test_a_client_that_leaves_mid_stream_is_recorded(start_gateway, fake_upstream, tmp_path) -> None:
    release = asyncio.Event()
    first_sent = asyncio.Event()

    async def gate(i: int) -> None:
        first_sent.set()
        await release.wait()

    fake_upstream.reply = Reply(chunks=[sse(START), sse(DELTA)], gate=gate)
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"event: message_start")
    await asyncio.wait_for(first_sent.wait(), 5)
    resp.close()  # the client goes away
    team = _team(client)
    for _ in range(200):  # the gateway notices at its next write or read: bounded wait
        if team.recorder.pending:
            break
        release.set()
        await asyncio.sleep(0.01)
    (row,) = await _rows(client)
    assert row["outcome"] == "client_left" and row["input_tokens"] == 12


async def test_an_upstream_error_and_a_refusal_are_recorded(start_gateway, fake_upstream, tmp_path) -> None:
    error = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})
    fake_upstream.reply = Reply(status=400, headers={"Content-Type": "application/json"}, chunks=[error])
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 400
    assert (await client.post("/v1/messages", data=message_body("nope-model"), headers=AUTH)).status == 400
    upstream_400, not_found = await _rows(client)
    assert (upstream_400["status"], upstream_400["error_type"], upstream_400["outcome"]) == (
        400,
        "invalid_request_error",
        "error",
    )
    assert (not_found["status"], not_found["channel"], not_found["model"]) == (400, None, "nope-model")


async def test_rpm_limit_of_a_member(start_gateway, fake_upstream, tmp_path) -> None:
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    key = await _member(client, "bob", limits=Limits(rpm=2))
    headers = {"x-api-key": key}
    for _ in range(2):
        assert (await client.post("/v1/messages", data=message_body(), headers=headers)).status == 200
    resp = await client.post("/v1/messages", data=message_body(), headers=headers)
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert "x-should-retry" not in resp.headers
    body = await resp.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("rate limit of bob: 2 requests per minute")
    # Another member and the shared key are not affected.
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 200
    assert len(fake_upstream.requests) == 3


async def test_concurrency_limit_is_released_when_a_stream_ends(
    start_gateway, fake_upstream, tmp_path
) -> None:
    release = asyncio.Event()

    async def gate(i: int) -> None:
        await release.wait()

    fake_upstream.reply = Reply(chunks=[sse(START), sse(DELTA, {"type": "message_stop"})], gate=gate)
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    key = await _member(client, "carol", limits=Limits(maxConcurrent=1))
    headers = {"x-api-key": key}
    held = await client.post("/v1/messages", data=message_body(), headers=headers)
    assert held.status == 200
    refused = await client.post("/v1/messages", data=message_body(), headers=headers)
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"
    assert "concurrency limit of carol: 1 requests at once" in (await refused.json())["error"]["message"]
    release.set()
    await held.read()
    fake_upstream.reply = Reply()
    assert (await client.post("/v1/messages", data=message_body(), headers=headers)).status == 200


async def test_daily_budget_refuses_with_no_retry(start_gateway, fake_upstream, tmp_path) -> None:
    fake_upstream.reply = Reply(chunks=[STREAM])
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    key = await _member(client, "dave", limits=Limits(dailyTokens=1000, dailyUsd=100))
    headers = {"x-api-key": key}
    assert (await client.post("/v1/messages", data=message_body(), headers=headers)).status == 200
    resp = await client.post("/v1/messages", data=message_body(), headers=headers)  # 5799 > 1000: spent
    assert resp.status == 429 and resp.headers["x-should-retry"] == "false"
    assert int(resp.headers["Retry-After"]) >= 1
    message = (await resp.json())["error"]["message"]
    assert message.startswith("daily token budget of dave (1,000) used up; resets at 00:00 UTC")
    assert len(fake_upstream.requests) == 1


async def test_models_and_channels_a_member_may_use(start_gateway, make_upstream, tmp_path) -> None:
    a, b = await make_upstream(), await make_upstream()
    client = await start_gateway(
        channel("a", a.url, priority=1),
        channel("b", b.url, priority=2),
        settings=make_settings(data_dir=str(tmp_path)),
    )
    key = await _member(client, "erin", models=["claude-haiku-*"], channels=["b"])
    headers = {"x-api-key": key}
    resp = await client.post("/v1/messages", data=message_body("claude-opus-4-8"), headers=headers)
    assert resp.status == 403 and resp.headers["x-should-retry"] == "false"
    assert (await resp.json())["error"]["message"].startswith(
        "member 'erin' may not use model 'claude-opus-4-8' (allowed: claude-haiku-*)"
    )
    resp = await client.post("/v1/messages", data=message_body("claude-haiku-4-5"), headers=headers)
    assert resp.status == 200 and resp.headers["x-ccx-channel"] == "b"  # a would come first
    pinned = await client.post(
        "/v1/messages", data=message_body("claude-haiku-4-5"), headers={**headers, "X-Channel": "a"}
    )
    assert pinned.status == 403 and "allowed channels: b" in (await pinned.json())["error"]["message"]
    assert a.requests == []


async def test_revoked_and_shared_keys(start_gateway, fake_upstream, tmp_path) -> None:
    client = await _gateway(start_gateway, fake_upstream, tmp_path, allow_shared_key=False)
    # No member yet: the shared key must keep working, or nobody could call.
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 200
    key = await _member(client, "frank")
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 401 and "ALLOW_SHARED_KEY=false" in (await resp.json())["error"]["message"]
    team = _team(client)
    await team.db.run(lambda conn: members.update(conn, "frank", status="revoked"))
    await team.refresh()
    resp = await client.post("/v1/messages", data=message_body(), headers={"x-api-key": key})
    assert (
        resp.status == 401
        and "the key of member 'frank' is revoked" in (await resp.json())["error"]["message"]
    )
    wrong = await client.post("/v1/messages", data=message_body(), headers={"x-api-key": "ccx-" + "x" * 43})
    assert wrong.status == 401


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("failure", ["read-only", "deleted", "locked"])
async def test_a_failing_database_never_fails_a_request(
    start_gateway, fake_upstream, tmp_path, failure
) -> None:
    fake_upstream.reply = Reply(chunks=[STREAM])
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    key = await _member(client, "gina")
    team = _team(client)
    path = team.db.path
    blocker: sqlite3.Connection | None = None
    if failure == "read-only":
        # Tests run as root, whom file modes do not stop: the connection itself refuses writes.
        await team.db.run(lambda conn: conn.execute("PRAGMA query_only = ON"))
    elif failure == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    else:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(3):
            resp = await client.post("/v1/messages", data=message_body(), headers={"x-api-key": key})
            assert resp.status == 200 and await resp.read() == STREAM
        await team.recorder.flush()
        if failure == "deleted":
            assert team.recorder.dropped == 0  # SQLite writes on into the unlinked file
        else:
            assert team.recorder.dropped == 0 and team.recorder.pending == 3  # tried once more
            await team.recorder.flush()
            assert team.recorder.dropped == 3
        assert team.index.by_name("gina") is not None  # the index in memory still serves
    finally:
        if blocker is not None:
            blocker.execute("ROLLBACK")
            blocker.close()


@pytest.mark.backends("sqlite")
async def test_a_database_that_cannot_be_opened_leaves_the_shared_key_working(
    start_gateway, fake_upstream, tmp_path, caplog
) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    client = await start_gateway(
        channel("up", fake_upstream.url), settings=make_settings(data_dir=str(blocked / "data"))
    )
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 200
    assert "team database unavailable, running with the shared keys only" in caplog.text
    await _team(client).recorder.flush()
    assert _team(client).recorder.dropped == 1


@pytest.mark.backends("sqlite")
async def test_the_key_is_never_stored_in_clear(start_gateway, fake_upstream, tmp_path) -> None:
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    key = await _member(client, "hana")
    assert (await client.post("/v1/messages", data=message_body(), headers={"x-api-key": key})).status == 200
    await _team(client).recorder.flush()
    for name in os.listdir(tmp_path):
        assert key.encode() not in (tmp_path / name).read_bytes(), name


async def test_a_nul_in_a_client_string_is_recorded_and_spoils_no_one_elses_records(
    start_gateway, fake_upstream, tmp_path
) -> None:
    # PostgreSQL refuses NUL in text: one such record used to fail its whole batch.
    fake_upstream.reply = Reply(chunks=[STREAM])
    client = await _gateway(start_gateway, fake_upstream, tmp_path)
    victim, mallory = await _member(client, "victim"), await _member(client, "mallory")
    body = orjson.loads(message_body("claude-sonnet-4-5"))
    body["model"] = "claude-sonnet-4-5\u0000"
    sent = [
        client.post("/v1/messages", data=message_body("claude-sonnet-4-5"), headers={"x-api-key": victim}),
        client.post(
            "/v1/messages",
            data=orjson.dumps(body),
            headers={"x-api-key": mallory},
        ),
        client.post("/v1/messages", data=message_body("claude-sonnet-4-5"), headers={"x-api-key": victim}),
    ]
    for response in await asyncio.gather(*sent):
        await response.read()
    rows = await _rows(client)
    assert sorted(r["member"] for r in rows) == ["mallory", "victim", "victim"]
    (bad,) = [r for r in rows if r["member"] == "mallory"]
    assert bad["model"] == "claude-sonnet-4-5\ufffd"
    assert _team(client).recorder.dropped == 0
