"""The built-in mock upstream speaks Anthropic's wire format."""

from typing import Any

import orjson
import pytest

from ccx_proxy.mock_upstream import DEFAULT_KEY, MockUpstream

KEY = {"x-api-key": DEFAULT_KEY}
BODY = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def mock(aiohttp_client: Any) -> Any:
    return await aiohttp_client(MockUpstream().app())


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = orjson.loads(data_line[6:])
        assert data["type"] == name_line[7:]
        events.append((name_line[7:], data))
    return events


async def test_stream_follows_anthropics_event_sequence(mock: Any) -> None:
    resp = await mock.post("/any/prefix/v1/messages", json={**BODY, "stream": True}, headers=KEY)
    assert resp.headers["Content-Type"] == "text/event-stream"
    events = _events(await resp.read())
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello from the ccx-proxy mock upstream (m). You said: hello there"


async def test_sized_stream_for_benchmarks(mock: Any) -> None:
    resp = await mock.post(
        "/v1/messages",
        json={**BODY, "stream": True},
        headers={**KEY, "x-mock-deltas": "40", "x-mock-delta-bytes": "100"},
    )
    deltas = [d for n, d in _events(await resp.read()) if n == "content_block_delta"]
    assert len(deltas) == 40 and all(len(d["delta"]["text"]) == 100 for d in deltas)


async def test_non_stream_count_tokens_and_models(mock: Any) -> None:
    message = await (await mock.post("/v1/messages", json=BODY, headers=KEY)).json()
    assert message["type"] == "message" and message["content"][0]["type"] == "text"
    count = await (await mock.post("/v1/messages/count_tokens", json=BODY, headers=KEY)).json()
    assert count["input_tokens"] > 0
    models = await (await mock.get("/v1/models", headers=KEY)).json()
    assert [m["id"] for m in models["data"]] == ["mock-opus", "mock-sonnet", "mock-haiku"]


@pytest.mark.parametrize(
    "headers, body, status, error_type",
    [
        pytest.param({}, BODY, 401, "authentication_error", id="no-key"),
        pytest.param({"x-api-key": "wrong"}, BODY, 401, "authentication_error", id="wrong-key"),
        pytest.param(KEY, {"model": "m"}, 400, "invalid_request_error", id="no-messages"),
        pytest.param(KEY, {**BODY, "max_tokens": 0}, 400, "invalid_request_error", id="bad-max-tokens"),
    ],
)
async def test_mock_errors(
    mock: Any, headers: dict[str, str], body: Any, status: int, error_type: str
) -> None:
    resp = await mock.post("/v1/messages", data=orjson.dumps(body), headers=headers)
    assert resp.status == status
    assert (await resp.json())["error"]["type"] == error_type


REMINDER = "<system-reminder>\nAs you answer, use the context below.\n</system-reminder>"


@pytest.mark.parametrize(
    "messages, said",
    [
        pytest.param(
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "what is 2+2?"}, {"type": "text", "text": REMINDER}],
                }
            ],
            "what is 2+2?",
            id="claude-code-reminder-last",
        ),
        pytest.param(
            [
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": [{"type": "text", "text": REMINDER}]},
            ],
            "first question",
            id="only-reminders-in-the-last-user-message",
        ),
        pytest.param(
            [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
            "two",
            id="last-text-block",
        ),
        pytest.param([{"role": "user", "content": REMINDER}], "", id="nothing-typed"),
    ],
)
async def test_echoes_what_the_person_typed_not_system_reminders(
    mock: Any, messages: list[Any], said: str
) -> None:
    message = await (await mock.post("/v1/messages", json={**BODY, "messages": messages}, headers=KEY)).json()
    assert message["content"][0]["text"] == f"Hello from the ccx-proxy mock upstream (m). You said: {said}"
