"""The admin API: auth, every endpoint, validation, optimistic concurrency, masking."""

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from ccx_proxy.app import create_app
from ccx_proxy.config import load_config
from ccx_proxy.mock_upstream import DEFAULT_KEY, MockUpstream
from tests.conftest import ACCESS_KEY, AUTH, assert_anthropic_error, make_settings, message_body

ADMIN_KEY = "admin-key-0123456789"
ADMIN = {"x-api-key": ADMIN_KEY}
LITERAL_KEY = "sk-literal-upstream-secret-7777"
BASE = "/api/messages/channels"


@pytest.fixture
async def mock_url(aiohttp_server: Any) -> str:
    server = await aiohttp_server(MockUpstream().app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def channels_file(tmp_path: Path, mock_url: str) -> Path:
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps(
            {
                "channels": [
                    {
                        "name": "mock",
                        "baseUrl": mock_url,
                        "apiKeys": [DEFAULT_KEY, LITERAL_KEY],
                        "modelMapping": {"opus": "mock-opus"},
                        "priority": 1,
                        "customHeaders": {"X-Org": "org-secret-1"},
                    },
                    {
                        "name": "deepseek",
                        "baseUrl": "https://api.deepseek.com/anthropic",
                        "apiKeys": ["${DEEPSEEK_KEY_UNSET}"],
                        "status": "disabled",
                        "priority": 2,
                        "someCcxField": True,
                    },
                ],
                "keepaliveMs": 0,
            },
            indent=2,
        )
    )
    return path


@pytest.fixture
async def admin(aiohttp_client: Any, channels_file: Path) -> Any:
    settings = make_settings(admin_keys=(ADMIN_KEY,), channels_file=str(channels_file), watch_interval=0)
    app = create_app(settings, load_config(channels_file, env={}))
    return await aiohttp_client(app)


async def _json(resp: Any) -> Any:
    return orjson.loads(await resp.read())


async def _version(client: Any) -> str:
    resp = await client.get(BASE, headers=ADMIN)
    return resp.headers["ETag"]


async def test_disabled_without_admin_key(aiohttp_client: Any, channels_file: Path) -> None:
    client = await aiohttp_client(
        create_app(make_settings(channels_file=str(channels_file)), load_config(channels_file, env={}))
    )
    resp = await client.get(BASE, headers=ADMIN)
    assert resp.status == 403
    assert "ADMIN_ACCESS_KEY" in assert_anthropic_error(403, await resp.read(), "permission_error")
    page = await client.get("/admin/")
    assert page.status == 403 and "ADMIN_ACCESS_KEY" in await page.text()


@pytest.mark.parametrize(
    "headers, status",
    [
        pytest.param({}, 401, id="missing"),
        pytest.param({"x-api-key": "wrong"}, 401, id="wrong"),
        pytest.param(AUTH, 401, id="proxy-key-is-not-admin"),
        pytest.param({"Authorization": f"Bearer {ADMIN_KEY}"}, 200, id="bearer"),
        pytest.param(ADMIN, 200, id="x-api-key"),
    ],
)
async def test_admin_auth(admin: Any, headers: dict[str, str], status: int) -> None:
    for method, path in (
        ("GET", BASE),
        ("GET", f"{BASE}/mock"),
        ("GET", "/api/messages/info"),
        ("GET", "/api/messages/route?model=opus"),
    ):
        resp = await admin.request(method, path, headers=headers)
        assert resp.status == status, path
        if status == 401:
            assert "ADMIN_ACCESS_KEY" in assert_anthropic_error(
                401, await resp.read(), "authentication_error"
            )


async def test_list_masks_secrets_and_carries_a_version(admin: Any) -> None:
    resp = await admin.get(BASE, headers=ADMIN)
    raw = await resp.read()
    data = orjson.loads(raw)
    assert resp.headers["ETag"] == f'"{data["version"]}"'
    mock, deepseek = data["channels"]
    assert mock["apiKeys"] == ["…-key", "sk-…7777"]
    assert mock["customHeaders"] == {"X-Org": "…et-1"}
    assert deepseek["apiKeys"] == ["${DEEPSEEK_KEY_UNSET}"]
    assert deepseek["someCcxField"] is True  # unknown CCX fields survive
    for secret in (LITERAL_KEY, DEFAULT_KEY, "org-secret-1", ACCESS_KEY, ADMIN_KEY):
        assert secret.encode() not in raw
    assert mock["state"]["health"] == "idle" and deepseek["state"]["health"] == "disabled"
    one = await admin.get(f"{BASE}/mock", headers=ADMIN)
    assert (await _json(one))["name"] == "mock" and one.headers["ETag"] == resp.headers["ETag"]
    missing = await admin.get(f"{BASE}/nope", headers=ADMIN)
    assert missing.status == 404


async def test_live_state_shows_traffic(admin: Any) -> None:
    for _ in range(3):
        resp = await admin.post("/v1/messages", data=message_body("claude-opus-4-1"), headers=AUTH)
        assert resp.status == 200
        await resp.read()
    state = (await _json(await admin.get(f"{BASE}/mock", headers=ADMIN)))["state"]
    assert state["health"] == "healthy" and state["requests"] == 3 and state["successRate"] == 1.0
    assert state["ttfbP50Ms"] is not None and state["ttfbP50Ms"] >= 0
    assert [k["state"] for k in state["keys"]] == ["ok", "ok"]


async def test_create_persists_validates_and_serves(admin: Any, channels_file: Path, mock_url: str) -> None:
    version = await _version(admin)
    new = {
        "name": "fresh",
        "baseUrl": mock_url,
        "apiKeys": ["${FRESH_KEY_NOT_SET}", DEFAULT_KEY],
        "status": "disabled",
        "modelMapping": {"sonnet": "mock-sonnet"},
    }
    resp = await admin.post(BASE, json=new, headers={**ADMIN, "If-Match": version})
    assert resp.status == 201
    view = await _json(resp)
    assert view["priority"] == 3 and view["apiKeys"] == ["${FRESH_KEY_NOT_SET}", "…-key"]
    stored = json.loads(channels_file.read_text())
    fresh = stored["channels"][2]
    assert fresh["apiKeys"] == ["${FRESH_KEY_NOT_SET}", DEFAULT_KEY]  # the reference, not a resolved value
    assert list(fresh) == ["name", "baseUrl", "apiKeys", "modelMapping", "priority", "status"]
    assert stored["keepaliveMs"] == 0

    dup = await admin.post(BASE, json={**new, "status": "active"}, headers=ADMIN)
    assert dup.status == 400 and "already exists" in (await _json(dup))["error"]["message"]


async def test_invalid_writes_are_400_with_field_problems_and_leave_the_file(
    admin: Any, channels_file: Path
) -> None:
    before = channels_file.read_bytes()
    bad = {
        "name": "bad",
        "baseUrl": "ftp://nowhere",
        "apiKeys": [],
        "authHeader": "basic",
        "supportedModels": ["a*b"],
    }
    resp = await admin.post(BASE, json=bad, headers=ADMIN)
    assert resp.status == 400
    error = (await _json(resp))["error"]
    fields = {p["field"] for p in error["problems"]}
    assert {"baseUrl", "authHeader", "apiKeys", "supportedModels[0]"} <= fields
    assert all(p["path"].startswith("channels[2].") for p in error["problems"])
    assert channels_file.read_bytes() == before
    for body in (b"not json", b"[1]", b'{"baseUrl":"https://x"}'):
        r = await admin.post(BASE, data=body, headers=ADMIN)
        assert r.status == 400
        assert_anthropic_error(400, await r.read(), "invalid_request_error")
    assert channels_file.read_bytes() == before


async def test_stale_version_is_409(admin: Any, channels_file: Path) -> None:
    version = await _version(admin)
    ok = await admin.patch(
        f"{BASE}/mock/status", json={"status": "suspended"}, headers={**ADMIN, "If-Match": version}
    )
    assert ok.status == 200 and ok.headers["ETag"] != version
    before = channels_file.read_bytes()
    stale = await admin.patch(
        f"{BASE}/mock/status", json={"status": "active"}, headers={**ADMIN, "If-Match": version}
    )
    assert stale.status == 409
    assert "stale" in assert_anthropic_error(409, await stale.read(), "conflict_error")
    assert channels_file.read_bytes() == before
    channels_file.write_text(
        channels_file.read_text().replace('"suspended"', '"disabled"')
    )  # an outside edit
    fresh = ok.headers["ETag"]
    resp = await admin.delete(f"{BASE}/deepseek", headers={**ADMIN, "If-Match": fresh})
    assert resp.status == 409


async def test_update_keeps_masked_secrets_and_renames(
    admin: Any, channels_file: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("CCX_TEST_ANOTHER", "sk-another-key-4444")
    view = await _json(await admin.get(f"{BASE}/mock", headers=ADMIN))
    edited = {k: v for k, v in view.items() if k != "state"}
    edited["name"] = "mock-renamed"
    edited["apiKeys"] = [*view["apiKeys"], "${CCX_TEST_ANOTHER}"]
    edited["modelMapping"] = {"opus": "mock-opus", "haiku": "mock-haiku"}
    resp = await admin.put(f"{BASE}/mock", json=edited, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    stored = json.loads(channels_file.read_text())["channels"][0]
    assert stored["name"] == "mock-renamed"
    assert stored["apiKeys"] == [DEFAULT_KEY, LITERAL_KEY, "${CCX_TEST_ANOTHER}"]
    assert stored["customHeaders"] == {"X-Org": "org-secret-1"}
    served = await admin.post(
        "/v1/messages", data=message_body("claude-haiku-4-6", stream=False), headers=AUTH
    )
    assert served.headers["x-ccx-channel"] == "mock-renamed"
    assert (await _json(served))["model"] == "mock-haiku"


async def test_status_reorder_delete(admin: Any, channels_file: Path) -> None:
    resp = await admin.patch(f"{BASE}/mock/status", json={"status": "paused"}, headers=ADMIN)
    assert resp.status == 400
    resp = await admin.post(f"{BASE}/reorder", json={"names": ["deepseek", "mock"]}, headers=ADMIN)
    assert resp.status == 200
    data = await _json(resp)
    assert [(c["name"], c["priority"]) for c in data["channels"]] == [("deepseek", 1), ("mock", 2)]
    bad = await admin.post(f"{BASE}/reorder", json={"names": ["mock"]}, headers=ADMIN)
    assert bad.status == 400 and "every channel exactly once" in (await _json(bad))["error"]["message"]
    resp = await admin.patch(f"{BASE}/mock/status", json={"status": "disabled"}, headers=ADMIN)
    assert resp.status == 200
    served = await admin.post("/v1/messages", data=message_body(), headers=AUTH)
    assert served.status == 400  # model_not_found: the only active channel was just disabled
    resp = await admin.delete(f"{BASE}/deepseek", headers=ADMIN)
    assert resp.status == 200
    # The one left is renumbered in the same write: priorities stay 1..n without gaps.
    assert [(c["name"], c["priority"]) for c in json.loads(channels_file.read_text())["channels"]] == [
        ("mock", 1)
    ]
    assert (await admin.delete(f"{BASE}/deepseek", headers=ADMIN)).status == 404


async def test_keys_add_and_remove(admin: Any, channels_file: Path) -> None:
    resp = await admin.post(f"{BASE}/mock/keys", json={"key": "sk-third-key-3333"}, headers=ADMIN)
    assert resp.status == 201 and (await _json(resp))["apiKeys"][-1] == "sk-…3333"
    assert (
        await admin.post(f"{BASE}/mock/keys", json={"key": "sk-third-key-3333"}, headers=ADMIN)
    ).status == 400
    assert (await admin.post(f"{BASE}/mock/keys", json={"key": ""}, headers=ADMIN)).status == 400
    resp = await admin.request("DELETE", f"{BASE}/mock/keys", json={"key": "sk-…7777"}, headers=ADMIN)
    assert resp.status == 200
    resp = await admin.request("DELETE", f"{BASE}/mock/keys", json={"index": 0}, headers=ADMIN)
    assert resp.status == 200
    assert json.loads(channels_file.read_text())["channels"][0]["apiKeys"] == ["sk-third-key-3333"]
    last = await admin.request("DELETE", f"{BASE}/mock/keys", json={"index": 0}, headers=ADMIN)
    assert last.status == 400  # an active channel needs a key: validation refuses
    assert "apiKeys" in {p["field"] for p in (await _json(last))["error"]["problems"]}


async def test_channel_test_reports_status_latency_and_masked_errors(admin: Any, aiohttp_server: Any) -> None:
    ok = await _json(await admin.post(f"{BASE}/mock/test", json={}, headers=ADMIN))
    assert ok["ok"] is True and ok["status"] == 200 and ok["latencyMs"] >= 0 and ok["error"] is None
    msg = await _json(
        await admin.post(
            f"{BASE}/mock/test", json={"mode": "message", "model": "claude-opus-4"}, headers=ADMIN
        )
    )
    assert msg["ok"] is True and msg["upstreamModel"] == "mock-opus"
    bad_key = await _json(await admin.post(f"{BASE}/mock/test", json={"keyIndex": 1}, headers=ADMIN))
    assert bad_key["ok"] is False and bad_key["status"] == 401 and "invalid x-api-key" in bad_key["error"]

    async def leaky(request: web.Request) -> web.Response:
        key = request.headers["x-api-key"]
        return web.json_response(
            {"type": "error", "error": {"type": "authentication_error", "message": f"key {key} is revoked"}},
            status=401,
        )

    app = web.Application()
    app.router.add_post("/v1/messages/count_tokens", leaky)
    server = await aiohttp_server(app)
    version = await _version(admin)
    await admin.post(
        BASE,
        json={"name": "leaky", "baseUrl": str(server.make_url("")), "apiKeys": [LITERAL_KEY]},
        headers={**ADMIN, "If-Match": version},
    )
    raw = await (await admin.post(f"{BASE}/leaky/test", json={}, headers=ADMIN)).read()
    assert LITERAL_KEY.encode() not in raw and "sk-…7777" in orjson.loads(raw)["error"]
    unset = await _json(await admin.post(f"{BASE}/deepseek/test", json={}, headers=ADMIN))
    assert unset["ok"] is False and "no usable key" in unset["error"]


async def test_route_preview_and_info(admin: Any) -> None:
    route = await _json(await admin.get("/api/messages/route?model=claude-opus-4-1", headers=ADMIN))
    assert route == {
        "model": "claude-opus-4-1",
        "channel": "mock",
        "upstreamModel": "mock-opus",
        "candidates": [{"channel": "mock", "upstreamModel": "mock-opus"}],
    }
    assert (await admin.get("/api/messages/route", headers=ADMIN)).status == 400
    info = await _json(await admin.get("/api/messages/info", headers=ADMIN))
    assert info["proxyKeyHint"].endswith(ACCESS_KEY[-4:]) and ACCESS_KEY not in json.dumps(info)


async def test_backups_are_kept_and_bounded(aiohttp_client: Any, channels_file: Path) -> None:
    settings = make_settings(
        admin_keys=(ADMIN_KEY,), channels_file=str(channels_file), watch_interval=0, config_backups=3
    )
    client = await aiohttp_client(create_app(settings, load_config(channels_file, env={})))
    original = channels_file.read_bytes()
    for status in ("suspended", "active", "suspended", "active", "disabled"):
        assert (
            await client.patch(f"{BASE}/mock/status", json={"status": status}, headers=ADMIN)
        ).status == 200
    backups = sorted((channels_file.parent / "backups").iterdir())
    assert len(backups) == 3
    assert original not in [b.read_bytes() for b in backups]  # the oldest were pruned
    assert all(json.loads(b.read_text())["channels"] for b in backups)


async def test_keys_with_the_same_mask_are_kept_by_position(admin: Any, channels_file: Path) -> None:
    twins = ["sk-aaaa-one-1234", "sk-bbbb-two-1234"]  # both mask to sk-…1234
    await admin.post(BASE, json={"name": "twins", "baseUrl": "https://t", "apiKeys": twins}, headers=ADMIN)
    view = await _json(await admin.get(f"{BASE}/twins", headers=ADMIN))
    assert view["apiKeys"] == ["sk-…1234", "sk-…1234"]
    body = {k: v for k, v in view.items() if k != "state"}
    assert (await admin.put(f"{BASE}/twins", json=body, headers=ADMIN)).status == 200
    assert json.loads(channels_file.read_text())["channels"][2]["apiKeys"] == twins
    ambiguous = {**body, "apiKeys": ["sk-…1234", "sk-extra-9999", "sk-…1234"]}  # the third: which twin?
    resp = await admin.put(f"{BASE}/twins", json=ambiguous, headers=ADMIN)
    assert resp.status == 400
    assert (await _json(resp))["error"]["problems"][0]["field"] == "apiKeys"
    swapped = {**body, "apiKeys": ["sk-new-key-5678", "sk-…1234"]}  # position 1 still matches in place
    resp = await admin.put(f"{BASE}/twins", json=swapped, headers=ADMIN)
    assert resp.status == 200
    assert json.loads(channels_file.read_text())["channels"][2]["apiKeys"] == ["sk-new-key-5678", twins[1]]


async def test_dot_names_are_refused(admin: Any) -> None:
    for name in (".", ".."):
        resp = await admin.post(
            BASE, json={"name": name, "baseUrl": "https://x", "apiKeys": ["k"]}, headers=ADMIN
        )
        assert resp.status == 400
        assert (await _json(resp))["error"]["problems"][0]["field"] == "name"


async def test_console_files_are_served_with_revalidation(admin: Any) -> None:
    page = await admin.get("/admin/", allow_redirects=False)
    assert page.status == 200 and page.headers["Cache-Control"] == "no-cache"
    assert "<html" in (await page.text()).lower()
    for name in ("app.js", "app.css"):
        resp = await admin.get(f"/admin/static/{name}")
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache"
    assert (await admin.get("/admin/static/..%2Fapi.py")).status == 404
    assert (await admin.get("/admin", allow_redirects=False)).status == 302


async def test_channel_test_takes_the_relay_path_to_every_url(admin: Any, aiohttp_server: Any) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    def upstream(status: int) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            seen.append((request.host, dict(request.headers)))
            return web.json_response({"input_tokens": 3}, status=status)

        app = web.Application()
        app.router.add_post("/v1/messages/count_tokens", handle)
        return app

    good, bad = await aiohttp_server(upstream(200)), await aiohttp_server(upstream(500))
    await admin.post(
        BASE,
        json={
            "name": "two-urls",
            "baseUrl": str(good.make_url("")),
            "baseUrls": [str(bad.make_url(""))],
            "apiKeys": [LITERAL_KEY],
            "customHeaders": {"X-Org": "org-secret-2"},
        },
        headers=ADMIN,
    )
    result = await _json(await admin.post(f"{BASE}/two-urls/test", json={}, headers=ADMIN))
    assert [u["status"] for u in result["urls"]] == [200, 500]
    assert result["ok"] is False and result["status"] == 200 and "upstream 500" in result["error"]
    assert [host for host, _ in seen] == [f"127.0.0.1:{good.port}", f"127.0.0.1:{bad.port}"]
    for _, headers in seen:  # the same channel header lines as relayed requests
        assert headers["x-api-key"] == LITERAL_KEY and headers["X-Org"] == "org-secret-2"
        assert headers["Accept-Encoding"] == "identity"


async def test_proxy_password_is_masked_and_kept_when_sent_back(admin: Any, channels_file: Path) -> None:
    version = await _version(admin)
    resp = await admin.post(
        BASE,
        json={
            "name": "proxied",
            "baseUrl": "https://api.example.com",
            "apiKeys": [LITERAL_KEY],
            "status": "disabled",
            "proxyUrl": "http://team:proxy-pass-123@proxy.internal:3128",
        },
        headers={**ADMIN, "If-Match": version},
    )
    assert resp.status == 201, await resp.text()
    raw = await (await admin.get(BASE, headers=ADMIN)).read()
    assert b"proxy-pass-123" not in raw
    view = await _json(await admin.get(f"{BASE}/proxied", headers=ADMIN))
    assert view["proxyUrl"] == "http://team:***@proxy.internal:3128"
    edited = {k: v for k, v in view.items() if k != "state"}
    edited["priority"] = 7
    assert (await admin.put(f"{BASE}/proxied", json=edited, headers=ADMIN)).status == 200
    stored = next(c for c in json.loads(channels_file.read_text())["channels"] if c["name"] == "proxied")
    assert stored["proxyUrl"] == "http://team:proxy-pass-123@proxy.internal:3128"


async def test_info_carries_the_presets_and_the_claude_code_ids(admin: Any) -> None:
    info = await _json(await admin.get("/api/messages/info", headers=ADMIN))
    assert set(info["presets"]) == {"anthropic", "deepseek", "kimi", "glm"}
    assert info["presets"]["glm"]["channel"]["authHeader"] == "bearer"
    assert info["presetsChecked"] == "2026-11-27"
    assert "claude-sonnet-4-5" in info["claudeCodeModels"]
