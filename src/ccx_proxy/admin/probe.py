"""The channel "Test" button: one tiny real request through one channel.

``count_tokens`` (free on Anthropic) by default, or a 1-token message.  The
result reports status, latency and the upstream's error text, with every key of
the channel masked.  It does not touch the channel's live health.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ..config import Channel
from ..headers import mask_secret
from ..upstream import gateway_error

DEFAULT_MODEL = "claude-haiku-4-5"
_LIMIT = 64 * 1024
_TIMEOUT = 30.0


def _scrub(text: str, channel: Channel) -> str:
    for secret in (*channel.api_keys, *(value for _, value in channel.custom_headers)):
        if len(secret) >= 6:  # a short header value is no secret worth hiding, and would mangle text
            text = text.replace(secret, mask_secret(secret))
    return text


async def probe_channel(
    session: aiohttp.ClientSession, channel: Channel, params: dict[str, Any]
) -> dict[str, Any]:
    mode = params.get("mode", "count_tokens")
    model = params.get("model") or DEFAULT_MODEL
    key_index = params.get("keyIndex", 0)
    result: dict[str, Any] = {
        "channel": channel.name,
        "mode": mode,
        "model": model,
        "ok": False,
        "status": None,
        "latencyMs": None,
        "error": None,
    }
    if mode not in ("count_tokens", "message") or not isinstance(model, str):
        result["error"] = 'mode must be "count_tokens" or "message", model a string'
        return result
    if not isinstance(key_index, int) or not 0 <= key_index < len(channel.credentials):
        result["error"] = (
            f"no usable key at index {key_index}: the channel has {len(channel.credentials)} resolved key(s)"
            " (a ${VAR} key whose variable is unset cannot be used)"
        )
        return result
    upstream_model = channel.models.lookup(model)
    result["upstreamModel"] = upstream_model
    body: dict[str, Any] = {"model": upstream_model, "messages": [{"role": "user", "content": "ping"}]}
    if mode == "message":
        body["max_tokens"] = 1
    url = channel.urls.count_tokens if mode == "count_tokens" else channel.urls.messages
    headers = [
        ("Content-Type", "application/json"),
        ("anthropic-version", "2023-06-01"),
        channel.credentials[key_index],
        *channel.custom_headers,
    ]
    started = time.perf_counter()
    try:
        async with asyncio.timeout(_TIMEOUT):
            async with session.post(
                URL(url, encoded=True),
                data=orjson.dumps(body),
                headers=headers,
                timeout=channel.timeouts.client_timeout,
            ) as response:
                payload = await response.content.read(_LIMIT)
                result["status"] = response.status
    except Exception as exc:
        error = gateway_error(exc, channel.name)
        if error is None:
            raise
        result["latencyMs"] = round((time.perf_counter() - started) * 1000, 1)
        result["error"] = _scrub(error.message, channel)
        return result
    result["latencyMs"] = round((time.perf_counter() - started) * 1000, 1)
    result["ok"] = 200 <= response.status < 300
    if not result["ok"]:
        text = _scrub(payload.decode("utf-8", "replace"), channel)  # before any cut
        try:
            text = str(orjson.loads(text)["error"]["message"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            text = text[:500]
        result["error"] = f"upstream {response.status}: {text}"
    return result
