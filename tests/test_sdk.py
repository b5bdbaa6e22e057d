"""The official ``anthropic`` SDK, through the gateway, to the built-in mock upstream."""

from typing import Any

import anthropic
import pytest

from ccx_proxy.mock_upstream import DEFAULT_KEY, MockUpstream
from tests.conftest import ACCESS_KEY


@pytest.fixture
async def sdk(aiohttp_server: Any, start_gateway: Any) -> Any:
    mock = await aiohttp_server(MockUpstream().app())
    gateway = await start_gateway(
        {
            "name": "mock",
            "baseUrl": str(mock.make_url("/some/prefix/")),
            "apiKeys": [DEFAULT_KEY],
            "modelMapping": {"opus": "mock-opus", "sonnet": "mock-sonnet", "haiku": "mock-haiku"},
        }
    )
    client = anthropic.AsyncAnthropic(
        api_key=ACCESS_KEY, base_url=str(gateway.make_url("")), max_retries=0, timeout=10
    )
    yield client
    await client.close()


async def test_non_streaming_message(sdk: anthropic.AsyncAnthropic) -> None:
    message = await sdk.messages.create(
        model="claude-sonnet-4-6", max_tokens=32, messages=[{"role": "user", "content": "ping"}]
    )
    assert message.model == "mock-sonnet"  # mapped on the way up
    assert message.content[0].type == "text"
    assert message.content[0].text.endswith("You said: ping")
    assert message.stop_reason == "end_turn"


async def test_streaming_message(sdk: anthropic.AsyncAnthropic) -> None:
    async with sdk.messages.stream(
        model="claude-opus-4-1", max_tokens=32, messages=[{"role": "user", "content": "stream me"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from the ccx-proxy mock upstream (mock-opus). You said: stream me"
    assert final.model == "mock-opus" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(text.split(" "))


async def test_count_tokens(sdk: anthropic.AsyncAnthropic) -> None:
    result = await sdk.messages.count_tokens(
        model="claude-haiku-4-6", messages=[{"role": "user", "content": "how many tokens?"}]
    )
    assert result.input_tokens > 0


async def test_models_list(sdk: anthropic.AsyncAnthropic) -> None:
    ids = [m.id async for m in sdk.models.list(limit=3)]  # auto-paginates past the first page
    # The Claude Code ids the mapping covers, never the bare keys (opus, sonnet, haiku).
    assert ids == [
        "claude-opus-4-8",
        "claude-opus-4-7",
        "claude-opus-4-6",
        "claude-opus-4-5",
        "claude-sonnet-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
    ]
    first = await sdk.models.list(limit=3)
    assert first.has_more and first.first_id == "claude-opus-4-8" and first.last_id == "claude-opus-4-6"
    model = await sdk.models.retrieve("claude-sonnet-4-5")
    assert model.id == "claude-sonnet-4-5" and model.display_name == "Claude Sonnet 4.5"
    assert model.created_at.isoformat() == "2025-09-29T00:00:00+00:00"
    with pytest.raises(anthropic.NotFoundError, match="model_not_found"):
        await sdk.models.retrieve("opus")


async def test_wrong_key_raises_authentication_error(sdk: anthropic.AsyncAnthropic) -> None:
    bad = sdk.with_options(api_key="not-the-key")
    with pytest.raises(anthropic.AuthenticationError):
        await bad.messages.create(
            model="claude-sonnet-4-6", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )


async def test_unknown_model_raises_bad_request(aiohttp_server: Any, start_gateway: Any) -> None:
    mock = await aiohttp_server(MockUpstream().app())
    gateway = await start_gateway(
        {
            "name": "m",
            "baseUrl": str(mock.make_url("")),
            "apiKeys": [DEFAULT_KEY],
            "supportedModels": ["claude-*"],
        }
    )
    async with anthropic.AsyncAnthropic(
        api_key=ACCESS_KEY, base_url=str(gateway.make_url("")), max_retries=0
    ) as client:
        with pytest.raises(anthropic.BadRequestError, match="model_not_found: .* it serves claude-opus-4-8"):
            await client.messages.create(
                model="gpt-4o", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
