"""A thinking session that fails over between providers that check thinking differently.

Three mock upstreams stand in for what providers do with a conversation's thinking
blocks (the facts quoted in ``ccx_proxy.thinking``):

* ``Minting``: answers thinking + tool_use, its thinking signed with a signature of its own
  (``mint-...``), or, as Anthropic sometimes does, a ``redacted_thinking`` block.
* ``AnthropicLike``: refuses a thinking block whose signature it did not mint, with
  Anthropic's message; while thinking is on, refuses a final assistant tool-use turn that
  does not start with thinking; while it is off, refuses thinking in that turn.
* ``DeepSeekLike``: refuses ``redacted_thinking``, and, while thinking is on, an assistant
  tool-use turn without a thinking block (DeepSeek's "must be passed back").

Each test walks one session: turn 1 on the first channel, which then overloads, so
turn 2 fails over; turn 3 shows the session staying on the channel it moved to although
the first one is back.  With the channel options on, turn 2 succeeds; off, the client gets
the upstream's 400 (a request fault, relayed as is).
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import AUTH, channel

SESSION = {**AUTH, "X-Claude-Code-Session-Id": "cross-provider-1"}
TOOL = {"name": "read_file", "description": "read a file", "input_schema": {"type": "object"}}


def _error(status: int, error_type: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return web.json_response(body, status=status)


def _message(model: str, content: list[dict[str, Any]], stop: str) -> web.Response:
    return web.json_response(
        {
            "id": "msg_" + secrets.token_hex(6),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
    )


def _assistant_turns(doc: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]]]]:
    turns = []
    for i, message in enumerate(doc["messages"]):
        if message["role"] == "assistant" and isinstance(message["content"], list):
            turns.append((i, message["content"]))
    return turns


def _thinking_on(doc: dict[str, Any]) -> bool:
    return doc.get("thinking", {}).get("type") in ("enabled", "adaptive")


class Provider:
    """The common part: a switch to overload, and what each request carried."""

    def __init__(self) -> None:
        self.overloaded = False
        self.received: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        self.received.append(doc)
        if self.overloaded:
            return _error(529, "overloaded_error", "Overloaded")
        refusal = self.refuse(doc)
        if refusal is not None:
            return _error(400, "invalid_request_error", refusal)
        return self.answer(doc)

    def refuse(self, doc: dict[str, Any]) -> str | None:
        return None

    def answer(self, doc: dict[str, Any]) -> web.Response:
        if doc["messages"][-1]["role"] == "user" and isinstance(doc["messages"][-1]["content"], str):
            return _message(doc["model"], [*self.thinking(), self.tool_use()], "tool_use")
        return _message(doc["model"], [{"type": "text", "text": "done"}], "end_turn")

    def thinking(self) -> list[dict[str, Any]]:
        return []

    @staticmethod
    def tool_use() -> dict[str, Any]:
        return {"type": "tool_use", "id": "toolu_" + secrets.token_hex(4), "name": "read_file", "input": {}}


class Minting(Provider):
    def __init__(self, redacted: bool = False) -> None:
        super().__init__()
        self.redacted = redacted

    def thinking(self) -> list[dict[str, Any]]:
        if self.redacted:
            return [{"type": "redacted_thinking", "data": "EmwKAhgBEgy" + secrets.token_hex(40)}]
        return [
            {
                "type": "thinking",
                "thinking": "Read the file first.",
                "signature": "mint-" + secrets.token_hex(4),
            }
        ]


class AnthropicLike(Provider):
    def __init__(self) -> None:
        super().__init__()
        self.minted: set[str] = set()

    def thinking(self) -> list[dict[str, Any]]:
        signature = secrets.token_urlsafe(96)
        self.minted.add(signature)
        return [{"type": "thinking", "thinking": "Let me look.", "signature": signature}]

    def refuse(self, doc: dict[str, Any]) -> str | None:
        turns = _assistant_turns(doc)
        for i, content in turns:
            for j, block in enumerate(content):
                if block["type"] == "thinking" and block.get("signature") not in self.minted:
                    return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
        if not turns:
            return None
        i, last = turns[-1]
        has_tool_use = any(block["type"] == "tool_use" for block in last)
        if _thinking_on(doc) and has_tool_use and last[0]["type"] not in ("thinking", "redacted_thinking"):
            return (
                f"messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                f"`{last[0]['type']}`. When `thinking` is enabled, a final `assistant` message must "
                "start with a thinking block."
            )
        if not _thinking_on(doc) and any(b["type"] in ("thinking", "redacted_thinking") for b in last):
            return (
                "When thinking is disabled, an `assistant` message in the final position "
                "cannot contain `thinking`."
            )
        return None


class DeepSeekLike(Provider):
    def thinking(self) -> list[dict[str, Any]]:
        return [{"type": "thinking", "thinking": "Think, then read."}]  # no signature

    def refuse(self, doc: dict[str, Any]) -> str | None:
        for _, content in _assistant_turns(doc):
            kinds = [block["type"] for block in content]
            if "redacted_thinking" in kinds:
                return "content[].redacted_thinking is not supported"
            if _thinking_on(doc) and "tool_use" in kinds and "thinking" not in kinds:
                return "The `content[].thinking` in the thinking mode must be passed back to the API."
        return None


def _result(answer: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": answer["content"][-1]["id"], "content": "print(1)"}


def _turn(history: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 2048,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tools": [TOOL],
            "messages": history,
        }
    )


async def _session(client: Any, first: Provider) -> tuple[int, bytes, list[str]]:
    """Turns 1-3 of one session, up to the first that fails: (its status and body, or the
    last turn's; the channel of each turn)."""
    history: list[dict[str, Any]] = [{"role": "user", "content": "What is in setup.py?"}]
    channels: list[str] = []
    for turn in (1, 2, 3):
        if turn == 2:
            first.overloaded = True
        elif turn == 3:
            first.overloaded = False  # back, and still not chosen: the session stays where it moved
        resp = await client.post("/v1/messages", data=_turn(history), headers=SESSION)
        status, body = resp.status, await resp.read()
        channels.append(resp.headers.get("x-ccx-channel", ""))
        if status != 200:
            return status, body, channels
        answer = orjson.loads(body)
        history.append({"role": "assistant", "content": answer["content"]})
        if answer["stop_reason"] == "tool_use":
            result = {
                "type": "tool_result",
                "tool_use_id": answer["content"][-1]["id"],
                "content": "print(1)",
            }
            history.append({"role": "user", "content": [result]})
        else:
            history.append({"role": "user", "content": "Thanks. Now README?"})
    return status, body, channels


@pytest.mark.parametrize("options_on", [True, False], ids=["options-on", "options-off"])
async def test_signed_thinking_fails_over_to_an_upstream_that_checks_signatures(
    aiohttp_server: Any, start_gateway: Any, options_on: bool
) -> None:
    minting, anthropic = Minting(), AnthropicLike()
    first = await aiohttp_server(minting.app())
    second = await aiohttp_server(anthropic.app())
    # 127.0.0.1 is not anthropic.com: thinkingProvider says what the upstream is.
    options = {"thinkingSignatures": "strip-foreign", "thinkingProvider": "anthropic"} if options_on else {}
    client = await start_gateway(
        channel("other", str(first.make_url("")), priority=1),
        channel("anthropic", str(second.make_url("")), priority=2, **options),
    )
    status, body, channels = await _session(client, minting)
    if not options_on:
        assert status == 400 and channels == ["other", "anthropic"]
        assert b"Invalid `signature` in `thinking` block" in body
        return
    assert status == 200, body
    assert channels == ["other", "anthropic", "anthropic"]
    turn2 = anthropic.received[0]
    # The foreign block went; the tool-use turn no longer starts with thinking, so the
    # request went with thinking off rather than as a body Anthropic must refuse.
    assert turn2["thinking"] == {"type": "disabled"}
    assert [b["type"] for b in turn2["messages"][1]["content"]] == ["tool_use"]
    assert len(minting.received) == 2  # turn 3 never went back to the first channel


async def test_strip_foreign_keeps_what_anthropic_minted(aiohttp_server: Any, start_gateway: Any) -> None:
    """strip-foreign on an Anthropic channel keeps the blocks Anthropic minted itself."""
    anthropic = AnthropicLike()
    server = await aiohttp_server(anthropic.app())
    client = await start_gateway(
        channel(
            "anthropic",
            str(server.make_url("")),
            thinkingSignatures="strip-foreign",
            thinkingProvider="anthropic",
        )
    )
    history: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    answer = await (await client.post("/v1/messages", data=_turn(history), headers=SESSION)).json()
    history += [
        {"role": "assistant", "content": answer["content"]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": answer["content"][-1]["id"], "content": "x"}],
        },
    ]
    body = _turn(history)
    resp = await client.post("/v1/messages", data=body, headers=SESSION)
    assert resp.status == 200, await resp.text()
    assert anthropic.received[-1] == orjson.loads(body)  # nothing foreign: unchanged


@pytest.mark.parametrize(
    "options",
    [
        {"thinkingSignatures": "strip-foreign", "thinkingPassback": True},
        {"thinkingSignatures": "strip-foreign"},
        {},
    ],
    ids=["strip-foreign+passback", "strip-foreign-only", "off"],
)
async def test_redacted_thinking_fails_over_to_an_upstream_that_demands_passback(
    aiohttp_server: Any, start_gateway: Any, options: dict[str, Any]
) -> None:
    anthropic, deepseek = Minting(redacted=True), DeepSeekLike()
    first = await aiohttp_server(anthropic.app())
    second = await aiohttp_server(deepseek.app())
    client = await start_gateway(
        channel("anthropic", str(first.make_url("")), priority=1),
        channel("deepseek", str(second.make_url("")), priority=2, **options),
    )
    status, body, channels = await _session(client, anthropic)
    if not options:
        assert status == 400 and channels == ["anthropic", "deepseek"]
        assert b"redacted_thinking is not supported" in body
        return
    if "thinkingPassback" not in options:
        # Turn 2 passes with thinking turned off (its final tool-use turn lost its only
        # thinking block); turn 3 has thinking on and a tool-use turn with no thinking.
        assert status == 400 and channels == ["anthropic", "deepseek", "deepseek"]
        assert b"must be passed back" in body
        return
    assert status == 200, body
    assert channels == ["anthropic", "deepseek", "deepseek"]
    turn2 = deepseek.received[0]
    assert turn2["thinking"]["type"] == "enabled"
    assert turn2["messages"][1]["content"][0] == {"type": "thinking", "thinking": ""}
    assert [b["type"] for b in turn2["messages"][1]["content"]] == ["thinking", "tool_use"]
