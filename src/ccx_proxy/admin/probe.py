"""The channel "Test" button: one tiny real request through one channel, on the path
real traffic takes.

``count_tokens`` (free on Anthropic) by default, or a 1-token message, through the
gateway's one upstream client, to every base URL of the channel with the chosen
key: the same endpoints, egress proxy, TLS settings, channel header lines and
timeouts as relayed requests.  The result reports status, latency and the
upstream's error text for each URL, with every secret of the channel masked.  It
does not touch the channel's live health.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson
from multidict import CIMultiDict

from .. import __version__
from ..config import Channel, unset_variables
from ..headers import upstream_header_block
from ..upstream.bodies import client_error_body, scrub
from ..upstream.client import UpstreamClient
from ..upstream.errors import to_gateway_error
from ..upstream.wire import Endpoints

DEFAULT_MODEL = "claude-haiku-4-5"
_LIMIT = 64 * 1024
_TIMEOUT = 30.0
# What a client sends that matters upstream; the channel adds its key, customHeaders and
# Accept-Encoding exactly as for relayed requests.
_CLIENT_HEADERS = [
    (b"Content-Type", b"application/json"),
    (b"anthropic-version", b"2023-06-01"),
    (b"User-Agent", f"ccx-proxy/{__version__} (channel test)".encode()),
]


async def probe_channel(client: UpstreamClient, channel: Channel, params: dict[str, Any]) -> dict[str, Any]:
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
    if not isinstance(key_index, int) or not 0 <= key_index < len(channel.api_keys):
        result["error"] = no_key_message(channel, key_index)
        return result
    upstream_model = channel.models.lookup(model)
    result["upstreamModel"] = upstream_model
    body: dict[str, Any] = {"model": upstream_model, "messages": [{"role": "user", "content": "ping"}]}
    if mode == "message":
        body["max_tokens"] = 1
    payload = orjson.dumps(body)
    headers = upstream_header_block(_CLIENT_HEADERS, channel.header_lines[key_index], channel.custom_names)
    urls = [await _probe_url(client, channel, urls, mode, payload, headers) for urls in channel.all_urls]
    first = urls[0]
    result.update(status=first["status"], latencyMs=first["latencyMs"], error=first["error"])
    result["ok"] = all(u["ok"] for u in urls)
    if first["ok"] and not result["ok"]:
        result["error"] = "; ".join(f"{u['url']}: {u['error']}" for u in urls if not u["ok"])
    result["urls"] = urls
    return result


def no_key_message(channel: Channel, key_index: object) -> str:
    text = f"no usable key at index {key_index}: the channel has {len(channel.api_keys)} resolved key(s)"
    unset = unset_variables(channel.key_refs, os.environ)
    if not unset:
        return text
    exports = " ".join(f"{var}=..." for var in unset)
    return (
        f"{text}; environment variable {', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set"
        f' -- export {exports} and restart ccx-proxy, or set the channel\'s "status" to "disabled"'
    )


async def _probe_url(
    client: UpstreamClient, channel: Channel, urls: Endpoints, mode: str, payload: bytes, headers: bytes
) -> dict[str, Any]:
    endpoint = urls.count_tokens if mode == "count_tokens" else urls.messages
    out: dict[str, Any] = {
        "url": urls.base_url,
        "ok": False,
        "status": None,
        "latencyMs": None,
        "error": None,
    }
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    timeouts = channel.timeouts
    try:
        async with asyncio.timeout(_TIMEOUT):
            response = await client.request(
                endpoint,
                payload,
                headers,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.first_byte(False),
                deadline=loop.time() + _TIMEOUT,
            )
            try:
                response.set_read_timeout(timeouts.inactivity)
                raw = await response.read(_LIMIT)
            finally:
                response.close()
    except Exception as exc:
        error = to_gateway_error(exc, channel.name)
        if error is None:
            raise
        out["latencyMs"] = round((time.perf_counter() - started) * 1000, 1)
        out["error"] = scrub(error.message.encode(), channel.secrets).decode("utf-8", "replace")
        return out
    out["latencyMs"] = round((time.perf_counter() - started) * 1000, 1)
    status = response.status
    out["status"] = status
    out["ok"] = 200 <= status < 300
    if not out["ok"]:
        text = client_error_body(status, CIMultiDict(response.headers), raw, channel.secrets).decode(
            "utf-8", "replace"
        )
        try:
            text = str(orjson.loads(text)["error"]["message"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            text = text[:500]
        out["error"] = f"upstream {status}: {text}"
    return out
