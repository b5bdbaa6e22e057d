"""Auth, bad input, routes and the gateway's own errors, end to end."""

import orjson
import pytest

from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    UPSTREAM_KEY,
    FakeUpstream,
    assert_anthropic_error,
    channel,
    make_settings,
    message_body,
    unused_port,
)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"x-api-key": ACCESS_KEY}, id="x-api-key"),
        pytest.param({"Authorization": f"Bearer {ACCESS_KEY}"}, id="bearer"),
        pytest.param({"x-api-key": ACCESS_KEY, "Authorization": "Bearer wrong"}, id="x-api-key-wins"),
    ],
)
async def test_access_key_accepted(gateway, headers) -> None:
    resp = await gateway.post("/v1/messages", data=message_body(), headers=headers)
    assert resp.status == 200


@pytest.mark.parametrize(
    "headers, fragment",
    [
        pytest.param({}, "missing access key", id="missing"),
        pytest.param({"x-api-key": "wrong"}, "invalid access key", id="wrong"),
        pytest.param({"x-api-key": ACCESS_KEY + "x"}, "invalid access key", id="longer"),
        pytest.param({"Authorization": "Basic abc"}, "missing access key", id="basic-auth"),
        pytest.param({"x-api-key": "k\u00e9y"}, "invalid access key", id="non-ascii"),
    ],
)
async def test_access_key_refused(gateway, fake_upstream: FakeUpstream, headers, fragment) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        resp = await gateway.post(path, data=message_body(), headers=headers)
        assert resp.status == 401
        assert fragment in assert_anthropic_error(401, await resp.read(), "authentication_error")
    resp = await gateway.get("/v1/models", headers=headers)
    assert resp.status == 401
    assert fake_upstream.requests == []


async def test_extra_access_keys(start_gateway, fake_upstream: FakeUpstream) -> None:
    client = await start_gateway(
        channel("c", fake_upstream.url), settings=make_settings(access_keys=("primary", "extra-1", "extra-2"))
    )
    for key in ("primary", "extra-2"):
        assert (
            await client.post("/v1/messages", data=message_body(), headers={"x-api-key": key})
        ).status == 200
    assert (
        await client.post("/v1/messages", data=message_body(), headers={"x-api-key": "extra"})
    ).status == 401


@pytest.mark.parametrize(
    "body, fragment",
    [
        pytest.param(b"not json", "not valid JSON", id="not-json"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"[]", "must be a JSON object", id="array"),
        pytest.param(b'{"messages":[]}', "'model' is required", id="no-model"),
        pytest.param(b'{"model":["x"]}', "'model' must be a string", id="model-list"),
    ],
)
async def test_bad_bodies_get_400(gateway, fake_upstream: FakeUpstream, body: bytes, fragment: str) -> None:
    resp = await gateway.post("/v1/messages", data=body, headers=AUTH)
    assert resp.status == 400
    assert fragment in assert_anthropic_error(400, await resp.read(), "invalid_request_error")
    assert fake_upstream.requests == []


async def test_body_over_the_limit_gets_413(start_gateway, fake_upstream: FakeUpstream) -> None:
    client = await start_gateway(channel("c", fake_upstream.url), settings=make_settings(max_body_bytes=1000))
    resp = await client.post("/v1/messages", data=message_body(pad="x" * 2000), headers=AUTH)
    assert resp.status == 413
    assert "MAX_REQUEST_BODY_SIZE_MB" in assert_anthropic_error(413, await resp.read(), "request_too_large")

    async def chunked():  # no Content-Length: the limit still holds while reading
        yield message_body(pad="x" * 2000)

    resp = await client.post("/v1/messages", data=chunked(), headers=AUTH)
    assert resp.status == 413
    assert_anthropic_error(413, await resp.read(), "request_too_large")
    assert fake_upstream.requests == []


async def test_unknown_model_is_model_not_found(start_gateway, fake_upstream: FakeUpstream) -> None:
    client = await start_gateway(
        channel("only-claude", fake_upstream.url, supportedModels=["claude-*", "!claude-2*"]),
        channel("off", fake_upstream.url, status="disabled"),
    )
    for model in ("gpt-4o", "claude-2.1"):
        resp = await client.post("/v1/messages", data=message_body(model), headers=AUTH)
        # A 400, not a 404: Claude Code prints a 400's message as is (see test_claude_code).
        assert resp.status == 400 and resp.headers["x-should-retry"] == "false"
        message = assert_anthropic_error(400, await resp.read(), "invalid_request_error")
        assert message.startswith(f"model_not_found: this gateway does not serve model {model!r}; ")
        # It names the first ten ids GET /v1/models lists, and how many more there are.
        assert "it serves claude-opus-4-8, claude-opus-4-7, " in message and "(GET /v1/models" in message
    assert fake_upstream.requests == []


async def test_model_not_found_names_at_most_ten_served_ids(
    start_gateway, fake_upstream: FakeUpstream
) -> None:
    ids = [f"claude-custom-{i}" for i in range(12)]
    client = await start_gateway(channel("c", fake_upstream.url, supportedModels=ids))
    resp = await client.post("/v1/messages", data=message_body("claude-other"), headers=AUTH)
    message = assert_anthropic_error(400, await resp.read(), "invalid_request_error")
    assert ", ".join(ids[:10]) + " and 2 more (GET /v1/models lists them)" in message
    nothing = await start_gateway(channel("off", fake_upstream.url, status="disabled"))
    resp = await nothing.post("/v1/messages", data=message_body(), headers=AUTH)
    message = assert_anthropic_error(400, await resp.read(), "invalid_request_error")
    assert message.startswith("model_not_found:") and "lists no model" in message


async def test_allowlist_admits_the_mapped_name_too(start_gateway, fake_upstream: FakeUpstream) -> None:
    client = await start_gateway(
        channel("c", fake_upstream.url, supportedModels=["up-opus"], modelMapping={"opus": "up-opus"})
    )
    resp = await client.post("/v1/messages", data=message_body("claude-opus-4"), headers=AUTH)
    assert resp.status == 200
    assert fake_upstream.requests[-1].json()["model"] == "up-opus"


@pytest.mark.parametrize(
    "method, path, status, fragment",
    [
        # A wrong ANTHROPIC_BASE_URL is a 400: Claude Code prints its message verbatim.
        pytest.param("POST", "/v1/v1/messages", 400, "without /v1", id="doubled-v1"),
        pytest.param("POST", "/api/v1/messages", 400, "without /v1", id="prefixed"),
        pytest.param("POST", "/v1/messages/v1/messages", 400, "set it to the gateway root", id="messages"),
        pytest.param("POST", "/x/v1/messages/count_tokens", 400, "without /v1", id="count-tokens"),
        pytest.param("GET", "/v1/v1/models", 400, "without /v1", id="doubled-v1-models"),
        pytest.param("GET", "/nope", 404, "the gateway serves POST /v1/messages", id="unknown"),
        pytest.param("POST", "/v1/messages/batches", 404, "the gateway serves", id="batches"),
        pytest.param("GET", "/v1/messages", 405, "use POST", id="get-messages"),
        pytest.param("DELETE", "/v1/models", 405, "not allowed", id="delete-models"),
    ],
)
async def test_routing_errors(gateway, method, path, status, fragment) -> None:
    resp = await gateway.request(method, path, headers=AUTH)
    assert resp.status == status
    error_type = "not_found_error" if status == 404 else "invalid_request_error"
    assert fragment in assert_anthropic_error(status, await resp.read(), error_type)


async def test_unreachable_upstream_is_502_naming_the_channel_not_the_key(start_gateway) -> None:
    client = await start_gateway(channel("dead-end", f"http://127.0.0.1:{unused_port()}"))
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 502
    body = await resp.read()
    message = assert_anthropic_error(502, body, "api_error")
    assert "'dead-end'" in message and "unreachable" in message
    assert UPSTREAM_KEY.encode() not in body and UPSTREAM_KEY[-4:] not in message


async def test_health_needs_no_auth_and_shows_no_secrets(gateway) -> None:
    resp = await gateway.get("/health")
    assert resp.status == 200
    body = await resp.read()
    data = orjson.loads(body)
    assert data["status"] == "ok" and data["channels"] == {"active": 1, "total": 1}
    assert UPSTREAM_KEY.encode() not in body and ACCESS_KEY.encode() not in body


async def test_root_answers_probes_without_auth(gateway) -> None:
    for method in ("GET", "HEAD"):
        resp = await gateway.request(method, "/")
        assert resp.status == 200
    data = orjson.loads(await (await gateway.get("/")).read())
    assert data["name"] == "ccx-proxy" and "/v1/messages" in data["routes"]


async def test_models_list_and_get(start_gateway, fake_upstream: FakeUpstream) -> None:
    client = await start_gateway(
        channel(
            "a",
            fake_upstream.url,
            modelMapping={"opus": "x", "sonnet": "y"},
            supportedModels=["claude-exact", "c-*"],
        ),
        channel("b", fake_upstream.url, modelMapping={"sonnet": "z", "haiku": "w"}),
        channel("off", fake_upstream.url, modelMapping={"hidden": "h"}, status="suspended"),
    )
    resp = await client.get("/v1/models", headers=AUTH)
    page = orjson.loads(await resp.read())
    ids = [m["id"] for m in page["data"]]
    # "a": its exact allowlist entry; "b": the Claude Code ids its mapping covers.  Never a
    # bare mapping key ("opus"), never a suspended channel's names.
    expected = [
        "claude-exact",
        "claude-sonnet-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
    ]
    assert ids == expected
    assert page["has_more"] is False and page["first_id"] == ids[0] and page["last_id"] == ids[-1]
    assert all(m["type"] == "model" and m["created_at"] for m in page["data"])
    assert page["data"][1]["display_name"] == "Claude Sonnet 5"

    two = orjson.loads(await (await client.get("/v1/models?limit=2", headers=AUTH)).read())
    assert [m["id"] for m in two["data"]] == expected[:2] and two["has_more"] is True
    after = "/v1/models?after_id=claude-sonnet-5"
    rest = orjson.loads(await (await client.get(after, headers=AUTH)).read())
    assert [m["id"] for m in rest["data"]] == expected[2:] and rest["has_more"] is False
    before = "/v1/models?before_id=claude-haiku-4-5&limit=1"
    back = orjson.loads(await (await client.get(before, headers=AUTH)).read())
    assert [m["id"] for m in back["data"]] == ["claude-sonnet-4-5"] and back["has_more"] is True

    bad = await client.get("/v1/models?limit=0", headers=AUTH)
    assert bad.status == 400
    assert_anthropic_error(400, await bad.read(), "invalid_request_error")

    one = await client.get("/v1/models/claude-sonnet-4-6", headers=AUTH)
    assert orjson.loads(await one.read()) == page["data"][2]
    # Only what the list holds: not a bare key, not a name merely routed, not a suspended one.
    for model_id in ("sonnet", "claude-opus-4-1", "hidden", "c-anything"):
        resp = await client.get(f"/v1/models/{model_id}", headers=AUTH)
        assert resp.status == 404, model_id
        message = assert_anthropic_error(404, await resp.read(), "not_found_error")
        assert message.startswith(f"model_not_found: this gateway does not serve model {model_id!r}")
        assert "it serves claude-exact, claude-sonnet-5" in message
