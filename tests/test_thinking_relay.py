"""The thinking / Claude Code options end to end: applied only on the channels that set them."""

from __future__ import annotations

import orjson

from ccx_proxy.config import ConfigError
from tests.conftest import AUTH, channel, make_config

BILLING = "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=cli; cch=abc12;"


def _body() -> bytes:
    return orjson.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "stream": True,
            "system": [{"type": "text", "text": BILLING}, {"type": "text", "text": "You are Claude Code."}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig-from-another-provider"},
                        {"type": "text", "text": "hello"},
                    ],
                },
                {"role": "user", "content": "again"},
            ],
        }
    )


async def test_a_channel_without_options_gets_the_body_byte_for_byte(start_gateway, fake_upstream) -> None:
    client = await start_gateway(channel("plain", fake_upstream.url))
    body = _body()
    assert (await client.post("/v1/messages", data=body, headers=AUTH)).status == 200
    assert fake_upstream.requests[-1].body == body


async def test_options_rewrite_only_what_they_name(start_gateway, fake_upstream) -> None:
    client = await start_gateway(
        channel("deepseek", fake_upstream.url, stripBillingBlock=True, thinkingSignatures="strip-all")
    )
    assert (await client.post("/v1/messages", data=_body(), headers=AUTH)).status == 200
    sent = orjson.loads(fake_upstream.requests[-1].body)
    assert sent["system"] == [{"type": "text", "text": "You are Claude Code."}]
    assistant = sent["messages"][1]["content"]
    assert assistant == [{"type": "text", "text": "hello"}]
    assert sent["messages"][0] == {"role": "user", "content": "hi"}


def test_bad_option_values_are_config_problems() -> None:
    try:
        make_config(
            channel("x", "https://api.example.com", thinkingSignatures="strip", thinkingPassback="yes")
        )
    except ConfigError as exc:
        text = "\n".join(exc.problems)
        assert "channels[0].thinkingSignatures: must be one of keep, strip-foreign, strip-all" in text
        assert "channels[0].thinkingPassback: must be true or false" in text
    else:
        raise AssertionError("invalid options were accepted")
