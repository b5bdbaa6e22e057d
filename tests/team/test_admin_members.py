"""The team admin API: members and keys, usage reports, a member's own usage, and a
database that is not there.  On SQLite and PostgreSQL (tests/team/conftest.py), but for the
tests that read the SQLite file itself."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from ccx_proxy import cli
from ccx_proxy.state import GATEWAY, Gateway
from ccx_proxy.team.db import FILENAME
from ccx_proxy.team.members import key_hash
from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    FakeUpstream,
    GatewayFactory,
    Reply,
    assert_anthropic_error,
    channel,
    make_settings,
    message_body,
)

pytestmark = pytest.mark.backends("sqlite", "postgresql")

ADMIN_KEY = "admin-key-0123456789"
ADMIN = {"x-api-key": ADMIN_KEY}
KEY_FORMAT = re.compile(r"^ccx-[A-Za-z0-9_-]{43}$")
ANSWER = orjson.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 100, "output_tokens": 20},
    }
)
PRICES = {"claude-sonnet-*": {"input": 3, "output": 15}}  # 100 in + 20 out = $0.0006
COST = 0.0006


@pytest.fixture
async def team(start_gateway: GatewayFactory, fake_upstream: FakeUpstream, tmp_path: Path) -> Any:
    """A gateway with an admin key and a team database in tmp_path, in front of an
    upstream that answers every request with 100 input and 20 output tokens."""
    fake_upstream.reply = Reply(headers={"Content-Type": "application/json"}, chunks=[ANSWER])
    settings = make_settings(admin_keys=(ADMIN_KEY,), data_dir=str(tmp_path))
    return await start_gateway(
        channel("up", fake_upstream.url),
        channel("spare", fake_upstream.url),
        settings=settings,
        prices=PRICES,
    )


def _gateway(client: Any) -> Gateway:
    return client.server.app[GATEWAY]


async def _json(resp: Any) -> Any:
    return orjson.loads(await resp.read())


async def _add(client: Any, name: str, **fields: Any) -> str:
    resp = await client.post("/api/members", json={"name": name, **fields}, headers=ADMIN)
    assert resp.status == 201, await resp.text()
    return str((await _json(resp))["key"])


async def _call(client: Any, key: str, model: str = "claude-sonnet-4-5") -> int:
    resp = await client.post(
        "/v1/messages", data=message_body(model, stream=False), headers={"x-api-key": key}
    )
    await resp.read()
    return int(resp.status)


async def _status_within(client: Any, key: str, status: int, seconds: float = 1.5) -> float:
    """How long until ``key`` gets ``status`` on /v1/messages (fails after ``seconds``)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while await _call(client, key) != status:
        assert loop.time() - start < seconds, f"still not {status} after {seconds} s"
        await asyncio.sleep(0.05)
    return loop.time() - start


def _database_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.iterdir() if p.name.startswith(FILENAME))


# -- create ---------------------------------------------------------------------------------


@pytest.mark.backends("sqlite")
async def test_create_shows_the_key_once_and_stores_only_its_hash(
    team: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    resp = await team.post(
        "/api/members",
        json={"name": "alice", "limits": {"rpm": 60, "dailyUsd": 5}, "models": ["claude-*"]},
        headers=ADMIN,
    )
    assert resp.status == 201
    body = await _json(resp)
    key = body["key"]
    assert KEY_FORMAT.match(key)
    member = body["member"]
    assert member["name"] == "alice" and member["status"] == "active"
    assert member["keyPrefix"] == key[:8] + "…"
    assert member["limits"] == {"rpm": 60, "dailyUsd": 5.0}
    assert member["models"] == ["claude-*"] and member["channels"] == []
    assert member["today"] == {"tokens": 0, "usd": 0.0} and member["active"] == 0
    assert "key" not in member

    # Usable at once, both ways a client sends a key.
    assert await _call(team, key) == 200
    resp = await team.post(
        "/v1/messages", data=message_body(stream=False), headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 200

    for path in ("/api/members", "/api/members/alice"):
        resp = await team.get(path, headers=ADMIN)
        assert resp.status == 200
        assert key.encode() not in await resp.read()

    stored = _database_bytes(tmp_path)
    assert key.encode() not in stored and key[4:].encode() not in stored
    assert key_hash(key).encode() in stored
    with sqlite3.connect(tmp_path / FILENAME) as conn:
        assert conn.execute("SELECT key_hash, key_prefix FROM members").fetchall() == [
            (key_hash(key), key[:8] + "…")
        ]
    assert key not in caplog.text


async def test_create_conflict(team: Any) -> None:
    await _add(team, "alice")
    resp = await team.post("/api/members", json={"name": "alice"}, headers=ADMIN)
    assert resp.status == 409
    assert "exists" in assert_anthropic_error(409, await resp.read(), "conflict_error")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("a", id="one-char"),
        pytest.param("alice.b@example.com", id="email"),
        pytest.param("Team_7-x", id="mixed"),
        pytest.param("a" * 64, id="64-chars"),
    ],
)
async def test_valid_names(team: Any, name: str) -> None:
    key = await _add(team, name)
    assert await _call(team, key) == 200


@pytest.mark.parametrize(
    "body, field",
    [
        pytest.param({"name": ""}, "name", id="empty-name"),
        pytest.param({}, "name", id="no-name"),
        pytest.param({"name": 5}, "name", id="number-name"),
        pytest.param({"name": "-alice"}, "name", id="leading-dash"),
        pytest.param({"name": "a b"}, "name", id="space"),
        pytest.param({"name": "a/b"}, "name", id="slash"),
        pytest.param({"name": "a" * 65}, "name", id="65-chars"),
        pytest.param({"name": "shared"}, "reserved", id="shared-reserved"),
        pytest.param({"name": "bob\n"}, "name", id="trailing-newline"),
        pytest.param({"name": "x", "limits": {"rpm": 2**63}}, "limits.rpm", id="rpm-beyond-c-ssize"),
        pytest.param({"name": "x", "limits": {"rpm": -1}}, "limits.rpm", id="negative-rpm"),
        pytest.param({"name": "x", "limits": {"rpm": 1.5}}, "limits.rpm", id="fractional-rpm"),
        pytest.param({"name": "x", "limits": {"rpm": "5"}}, "limits.rpm", id="string-rpm"),
        pytest.param({"name": "x", "limits": {"maxConcurrent": True}}, "maxConcurrent", id="bool"),
        pytest.param({"name": "x", "limits": {"dailyUsd": -0.5}}, "limits.dailyUsd", id="negative-usd"),
        pytest.param({"name": "x", "limits": {"hourlyTokens": 5}}, "hourlyTokens", id="unknown-limit"),
        pytest.param({"name": "x", "limits": [1]}, "limits", id="limits-not-object"),
        pytest.param({"name": "x", "models": "claude-*"}, "models", id="models-not-list"),
        pytest.param({"name": "x", "models": [""]}, "models", id="empty-pattern"),
        pytest.param({"name": "x", "channels": ["nope"]}, "nope", id="unknown-channel"),
        pytest.param({"name": "x", "key": "ccx-mine"}, "key", id="unknown-field"),
        pytest.param(["x"], "object", id="not-an-object"),
    ],
)
async def test_create_rejects(team: Any, body: Any, field: str) -> None:
    resp = await team.post("/api/members", json=body, headers=ADMIN)
    assert resp.status == 400
    assert field in assert_anthropic_error(400, await resp.read(), "invalid_request_error")
    assert resp.headers["x-should-retry"] == "false"
    assert (await _json(await team.get("/api/members", headers=ADMIN)))["members"] == []


async def test_create_rejects_bad_json(team: Any) -> None:
    resp = await team.post("/api/members", data=b"{name", headers=ADMIN)
    assert resp.status == 400
    assert "JSON" in assert_anthropic_error(400, await resp.read(), "invalid_request_error")


async def test_member_models_and_channels_take_effect(team: Any, fake_upstream: FakeUpstream) -> None:
    key = await _add(team, "alice", models=["claude-haiku*"], channels=["spare"])
    assert await _call(team, key, "claude-sonnet-4-5") == 403
    assert await _call(team, key, "claude-haiku-4-5") == 200


# -- admin key ------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/api/members"),
    ("POST", "/api/members"),
    ("GET", "/api/members/alice"),
    ("PATCH", "/api/members/alice"),
    ("DELETE", "/api/members/alice"),
    ("POST", "/api/members/alice/rotate"),
    ("GET", "/api/usage"),
    ("GET", "/api/usage.csv"),
    ("GET", "/api/usage/requests"),
]


async def test_admin_routes_need_the_admin_key(team: Any) -> None:
    member_key = await _add(team, "alice")
    for headers in ({}, {"x-api-key": "wrong"}, AUTH, {"x-api-key": member_key}):
        for method, path in ROUTES:
            resp = await team.request(method, path, json={"name": "bob"}, headers=headers)
            assert resp.status == 401, (method, path, headers)
            assert "ADMIN_ACCESS_KEY" in assert_anthropic_error(
                401, await resp.read(), "authentication_error"
            )
    names = [m["name"] for m in (await _json(await team.get("/api/members", headers=ADMIN)))["members"]]
    assert names == ["alice"]
    resp = await team.get("/api/members", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status == 200


async def test_admin_routes_disabled_without_admin_key(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    client = await start_gateway(channel(), settings=make_settings(data_dir=str(tmp_path)))
    for method, path in ROUTES:
        resp = await client.request(method, path, headers=ADMIN)
        assert resp.status == 403, path


# -- list and get ---------------------------------------------------------------------------


@pytest.mark.backends("sqlite")
async def test_list_and_get(team: Any, tmp_path: Path) -> None:
    alice = await _add(team, "alice", limits={"rpm": 10})
    bob = await _add(team, "bob", channels=["up"])
    resp = await team.get("/api/members", headers=ADMIN)
    raw = await resp.read()
    assert alice.encode() not in raw and bob.encode() not in raw
    body = orjson.loads(raw)
    assert [m["name"] for m in body["members"]] == ["alice", "bob"]
    assert body["allowSharedKey"] is True and body["usageRecording"] is True
    assert body["database"] == str(tmp_path / FILENAME) and body["databaseOpen"] is True
    first = body["members"][0]
    assert set(first) >= {"name", "keyPrefix", "status", "limits", "models", "channels", "today", "month"}
    assert first["limits"] == {"rpm": 10} and body["members"][1]["channels"] == ["up"]

    resp = await team.get("/api/members/bob", headers=ADMIN)
    assert resp.status == 200
    assert (await _json(resp))["channels"] == ["up"]
    resp = await team.get("/api/members/carol", headers=ADMIN)
    assert resp.status == 404
    assert "carol" in assert_anthropic_error(404, await resp.read(), "not_found_error")


async def test_list_reads_the_database_not_the_index(team: Any, tmp_path: Path) -> None:
    """A member added by another process (the CLI) is listed before the poll sees it."""
    assert cli.main(["members", "add", "carol", "--data-dir", str(tmp_path)]) == 0
    names = [m["name"] for m in (await _json(await team.get("/api/members", headers=ADMIN)))["members"]]
    assert names == ["carol"]


# -- patch ----------------------------------------------------------------------------------


async def test_patch_merges_limits_and_null_clears(team: Any) -> None:
    await _add(team, "alice", limits={"rpm": 5, "dailyTokens": 1000})
    gateway = _gateway(team)

    async def patch(body: Any) -> Any:
        resp = await team.patch("/api/members/alice", json=body, headers=ADMIN)
        assert resp.status == 200, await resp.text()
        return await _json(resp)

    member = await patch({"limits": {"maxConcurrent": 2, "monthlyUsd": 12.5}})
    assert member["limits"] == {"rpm": 5, "maxConcurrent": 2, "dailyTokens": 1000, "monthlyUsd": 12.5}
    indexed = gateway.team.index.by_name("alice")
    assert indexed is not None and indexed.limits.maxConcurrent == 2  # this process: at once

    member = await patch({"limits": {"rpm": None, "dailyTokens": 2000}})
    assert member["limits"] == {"maxConcurrent": 2, "dailyTokens": 2000, "monthlyUsd": 12.5}
    member = await patch({"models": ["claude-haiku*"], "channels": ["spare"]})
    assert member["models"] == ["claude-haiku*"] and member["channels"] == ["spare"]
    assert member["limits"] == {"maxConcurrent": 2, "dailyTokens": 2000, "monthlyUsd": 12.5}
    member = await patch({"models": None, "channels": []})
    assert member["models"] == [] and member["channels"] == []
    member = await patch({"limits": {"maxConcurrent": None, "dailyTokens": None, "monthlyUsd": None}})
    assert member["limits"] == {}
    assert await patch({}) == member


@pytest.mark.parametrize(
    "body, status, words",
    [
        pytest.param({"limits": {"rpm": -1}}, 400, "limits.rpm", id="negative"),
        pytest.param({"limits": {"dailyTokens": 1.5}}, 400, "dailyTokens", id="fraction"),
        pytest.param({"limits": {"rpm": "ten"}}, 400, "limits.rpm", id="string"),
        pytest.param({"limits": {"burst": 3}}, 400, "burst", id="unknown-limit"),
        pytest.param({"limits": "none"}, 400, "limits", id="not-object"),
        pytest.param({"status": "paused"}, 400, "status", id="bad-status"),
        pytest.param({"status": None}, 400, "status", id="null-status"),
        pytest.param({"name": "bob"}, 400, "name", id="rename"),
        pytest.param({"models": ["claude-*", 3]}, 400, "models", id="bad-models"),
        pytest.param({"channels": ["gone"]}, 400, "gone", id="unknown-channel"),
    ],
)
async def test_patch_rejects(team: Any, body: Any, status: int, words: str) -> None:
    await _add(team, "alice", limits={"rpm": 5})
    resp = await team.patch("/api/members/alice", json=body, headers=ADMIN)
    assert resp.status == status
    assert words in assert_anthropic_error(status, await resp.read(), "invalid_request_error")
    member = await _json(await team.get("/api/members/alice", headers=ADMIN))
    assert member["limits"] == {"rpm": 5} and member["status"] == "active"


async def test_patch_unknown_member(team: Any) -> None:
    resp = await team.patch("/api/members/nobody", json={"limits": {"rpm": 1}}, headers=ADMIN)
    assert resp.status == 404
    assert_anthropic_error(404, await resp.read(), "not_found_error")


async def test_patched_limit_applies_at_once(team: Any) -> None:
    key = await _add(team, "alice")
    assert await _call(team, key) == 200
    resp = await team.patch("/api/members/alice", json={"limits": {"rpm": 1}}, headers=ADMIN)
    assert resp.status == 200
    assert await _call(team, key) == 200
    assert await _call(team, key) == 429


# -- revoke, rotate, delete -----------------------------------------------------------------


async def test_revoke_and_activate_through_the_api(team: Any) -> None:
    key = await _add(team, "alice")
    assert await _call(team, key) == 200
    resp = await team.patch("/api/members/alice", json={"status": "revoked"}, headers=ADMIN)
    assert resp.status == 200 and (await _json(resp))["status"] == "revoked"
    resp = await team.post("/v1/messages", data=message_body(stream=False), headers={"x-api-key": key})
    assert resp.status == 401
    assert "revoked" in assert_anthropic_error(401, await resp.read(), "authentication_error")
    resp = await team.patch("/api/members/alice", json={"status": "active"}, headers=ADMIN)
    assert resp.status == 200
    assert await _call(team, key) == 200


async def test_revoke_through_the_cli_reaches_the_running_gateway(team: Any, tmp_path: Path) -> None:
    key = await _add(team, "alice")
    assert await _call(team, key) == 200
    assert cli.main(["members", "revoke", "alice", "--data-dir", str(tmp_path)]) == 0
    assert await _status_within(team, key, 401) < 1.5
    assert cli.main(["members", "activate", "alice", "--data-dir", str(tmp_path)]) == 0
    assert await _status_within(team, key, 200) < 1.5


@pytest.mark.backends("sqlite")
async def test_rotate(team: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    old = await _add(team, "alice")
    assert await _call(team, old) == 200
    resp = await team.post("/api/members/alice/rotate", headers=ADMIN)
    assert resp.status == 200
    body = await _json(resp)
    new = body["key"]
    assert KEY_FORMAT.match(new) and new != old
    assert body["member"]["keyPrefix"] == new[:8] + "…" and "key" not in body["member"]
    assert await _call(team, old) == 401
    assert await _call(team, new) == 200
    stored = _database_bytes(tmp_path)
    assert new.encode() not in stored and key_hash(new).encode() in stored
    assert new not in caplog.text and old not in caplog.text
    resp = await team.post("/api/members/nobody/rotate", headers=ADMIN)
    assert resp.status == 404


async def test_delete(team: Any) -> None:
    key = await _add(team, "alice")
    await _add(team, "bob")
    assert await _call(team, key) == 200
    resp = await team.delete("/api/members/alice", headers=ADMIN)
    assert resp.status == 200 and await _json(resp) == {"deleted": "alice"}
    assert await _call(team, key) == 401
    assert (await team.get("/api/members/alice", headers=ADMIN)).status == 404
    names = [m["name"] for m in (await _json(await team.get("/api/members", headers=ADMIN)))["members"]]
    assert names == ["bob"]
    resp = await team.delete("/api/members/alice", headers=ADMIN)
    assert resp.status == 404
    assert_anthropic_error(404, await resp.read(), "not_found_error")
    # The name is free again, with a new key.
    again = await _add(team, "alice")
    assert again != key and await _call(team, again) == 200


# -- usage ----------------------------------------------------------------------------------


async def _traffic(client: Any) -> dict[str, str]:
    """alice: 2 requests, bob: 1, the shared key: 1; written to the database."""
    keys = {"alice": await _add(client, "alice"), "bob": await _add(client, "bob")}
    for key in (keys["alice"], keys["alice"], keys["bob"], ACCESS_KEY):
        assert await _call(client, key) == 200
    await _gateway(client).team.recorder.flush()
    return keys


async def test_usage_report(team: Any) -> None:
    await _traffic(team)
    resp = await team.get("/api/usage", headers=ADMIN)
    assert resp.status == 200
    body = await _json(resp)
    assert body["groupBy"] == ["member"] and body["from"] <= body["to"]
    by_member = {row["member"]: row for row in body["rows"]}
    assert set(by_member) == {"alice", "bob", "shared"}
    alice = by_member["alice"]
    assert (alice["requests"], alice["errors"], alice["input_tokens"], alice["output_tokens"]) == (
        2,
        0,
        200,
        40,
    )
    assert alice["cost_usd"] == pytest.approx(2 * COST)
    assert body["totals"]["requests"] == 4 and body["totals"]["input_tokens"] == 400
    assert body["totals"]["cost_usd"] == pytest.approx(4 * COST)

    resp = await team.get("/api/usage?groupBy=day,model,channel&member=alice&since=7d", headers=ADMIN)
    body = await _json(resp)
    assert body["groupBy"] == ["day", "model", "channel"]
    assert [(r["model"], r["channel"], r["requests"]) for r in body["rows"]] == [
        ("claude-sonnet-4-5", "up", 2)
    ]
    resp = await team.get("/api/usage?from=2000-01-01&to=2000-01-31", headers=ADMIN)
    body = await _json(resp)
    assert body["rows"] == [] and body["totals"]["requests"] == 0

    # The member list carries the spend this process counted.
    listed = await _json(await team.get("/api/members", headers=ADMIN))
    alice_view = next(m for m in listed["members"] if m["name"] == "alice")
    assert alice_view["today"]["tokens"] == 240
    assert alice_view["today"]["usd"] == pytest.approx(2 * COST)
    assert alice_view["lastUsedAt"] is not None


async def test_usage_csv(team: Any) -> None:
    await _traffic(team)
    resp = await team.get("/api/usage.csv?groupBy=member&from=2000-01-01", headers=ADMIN)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    today = (await _json(await team.get("/api/usage", headers=ADMIN)))["to"]
    assert resp.headers["Content-Disposition"] == f'attachment; filename="ccx-usage-2000-01-01-{today}.csv"'
    lines = (await resp.text()).splitlines()
    assert lines[0].split(",")[:3] == ["member", "requests", "errors"]
    assert [line.split(",")[:2] for line in lines[1:]] == [["alice", "2"], ["bob", "1"], ["shared", "1"]]


async def test_recent_requests(team: Any) -> None:
    await _traffic(team)
    body = await _json(await team.get("/api/usage/requests", headers=ADMIN))
    assert len(body["requests"]) == 4
    assert body["requests"][0]["ts"] >= body["requests"][-1]["ts"]
    body = await _json(await team.get("/api/usage/requests?member=alice&limit=1", headers=ADMIN))
    assert [(r["member"], r["status"], r["input_tokens"]) for r in body["requests"]] == [("alice", 200, 100)]


@pytest.mark.parametrize(
    "query, words",
    [
        pytest.param("since=7x", "since", id="bad-since"),
        pytest.param("from=2024-13-01", "from", id="bad-month"),
        pytest.param("to=yesterday", "to", id="bad-to"),
        pytest.param("from=2024-02-01&to=2024-01-01", "after", id="reversed"),
        pytest.param("groupBy=team", "groupBy", id="bad-group"),
        pytest.param("groupBy=day,day", "groupBy", id="twice"),
    ],
)
async def test_usage_rejects(team: Any, query: str, words: str) -> None:
    for path in ("/api/usage", "/api/usage.csv"):
        resp = await team.get(f"{path}?{query}", headers=ADMIN)
        assert resp.status == 400
        assert words in assert_anthropic_error(400, await resp.read(), "invalid_request_error")


@pytest.mark.parametrize("limit", ["0", "abc", "-1", "1001"])
async def test_recent_requests_rejects_limit(team: Any, limit: str) -> None:
    resp = await team.get(f"/api/usage/requests?limit={limit}", headers=ADMIN)
    assert resp.status == 400
    assert "limit" in assert_anthropic_error(400, await resp.read(), "invalid_request_error")


# -- /api/me/usage --------------------------------------------------------------------------


async def test_me_sees_only_their_own_usage(team: Any) -> None:
    keys = await _traffic(team)
    resp = await team.get("/api/me/usage?member=bob&groupBy=member", headers={"x-api-key": keys["alice"]})
    assert resp.status == 200
    raw = await resp.read()
    assert b"bob" not in raw and keys["alice"].encode() not in raw
    body = orjson.loads(raw)
    assert body["member"]["name"] == "alice" and "key" not in body["member"]
    assert body["limits"] == {}
    assert body["today"]["tokens"] == 240 and body["month"]["tokens"] == 240
    assert [row["requests"] for row in body["usage"]] == [2] and "day" in body["usage"][0]
    assert len(body["recent"]) == 2
    assert {r["member"] for r in body["recent"]} == {"alice"}
    assert all("key_id" not in r for r in body["recent"])

    resp = await team.get("/api/me/usage", headers={"Authorization": f"Bearer {keys['bob']}"})
    body = await _json(resp)
    assert body["member"]["name"] == "bob"
    assert [row["requests"] for row in body["usage"]] == [1]
    assert {r["member"] for r in body["recent"]} == {"bob"}

    body = await _json(await team.get("/api/me/usage", headers=AUTH))
    assert body["member"]["name"] == "shared"
    assert {r["member"] for r in body["recent"]} == {"shared"}


async def test_me_needs_a_member_key(team: Any) -> None:
    key = await _add(team, "alice")
    for headers in ({}, {"x-api-key": "ccx-" + "x" * 43}, ADMIN):
        resp = await team.get("/api/me/usage", headers=headers)
        assert resp.status == 401
        assert_anthropic_error(401, await resp.read(), "authentication_error")
    await team.patch("/api/members/alice", json={"status": "revoked"}, headers=ADMIN)
    resp = await team.get("/api/me/usage", headers={"x-api-key": key})
    assert resp.status == 401


# -- no database ----------------------------------------------------------------------------


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("where", ["file-in-the-way", "none"])
async def test_database_unavailable_is_503(
    start_gateway: GatewayFactory, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    data_dir = str(blocker) if where == "file-in-the-way" else None
    client = await start_gateway(
        channel(), settings=make_settings(admin_keys=(ADMIN_KEY,), data_dir=data_dir)
    )
    for method, path, headers in (
        ("POST", "/api/members", ADMIN),
        ("GET", "/api/members/alice", ADMIN),
        ("PATCH", "/api/members/alice", ADMIN),
        ("DELETE", "/api/members/alice", ADMIN),
        ("POST", "/api/members/alice/rotate", ADMIN),
        ("GET", "/api/usage", ADMIN),
        ("GET", "/api/usage.csv", ADMIN),
        ("GET", "/api/usage/requests", ADMIN),
        ("GET", "/api/me/usage", AUTH),
    ):
        resp = await client.request(method, path, json={"name": "alice"}, headers=headers)
        assert resp.status == 503, path
        message = assert_anthropic_error(503, await resp.read(), "api_error")
        assert "team database is unavailable" in message and "DATA_DIR" in message
        assert resp.headers["x-should-retry"] == "false"
    body = await _json(await client.get("/api/members", headers=ADMIN))
    assert body["members"] == [] and body["databaseOpen"] is False
    assert body["database"] == (None if data_dir is None else str(blocker / FILENAME))
    # The gateway itself runs on with the shared key.
    resp = await client.get("/v1/models", headers=AUTH)
    assert resp.status == 200


async def test_the_admin_key_never_serves_v1(team: Any) -> None:
    await _add(team, "alice")  # with members and without, the admin key is not a client key
    for path, method in (("/v1/messages", "POST"), ("/v1/models", "GET"), ("/api/me/usage", "GET")):
        resp = await team.request(method, path, data=message_body(), headers=ADMIN)
        assert resp.status == 401, path
        assert_anthropic_error(401, await resp.read(), "authentication_error")
