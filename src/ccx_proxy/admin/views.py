"""How channels look to admins: masked keys and headers, live state."""

from __future__ import annotations

import re
import statistics
from typing import Any

from ..config import Channel
from ..headers import mask_secret
from ..health import ChannelHealth
from ..upstream.wire import mask_proxy_url

_ENV_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def mask_value(value: str) -> str:
    """``${VAR}`` references stay readable; literal secrets are masked."""
    return value if _ENV_REF.match(value) else mask_secret(value)


def masked_channel(raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    keys = raw.get("apiKeys")
    if isinstance(keys, list):
        out["apiKeys"] = [mask_value(k) if isinstance(k, str) else k for k in keys]
    headers = raw.get("customHeaders")
    if isinstance(headers, dict):
        out["customHeaders"] = {k: mask_value(v) if isinstance(v, str) else v for k, v in headers.items()}
    proxy = raw.get("proxyUrl")
    if isinstance(proxy, str) and proxy:
        out["proxyUrl"] = mask_proxy_url(proxy)  # the password, never the rest
    return out


def unmask(submitted: list[Any], existing: list[Any]) -> list[Any]:
    """Values sent back in masked form mean "keep the stored one".

    A masked value first matches the stored value at the same position, else the
    only stored value with that mask; when several stored values share a mask the
    edit is refused rather than guessed.
    """
    out = []
    for i, value in enumerate(submitted):
        if not isinstance(value, str):
            out.append(value)
            continue
        if i < len(existing) and isinstance(existing[i], str) and mask_value(existing[i]) == value:
            out.append(existing[i])
            continue
        same = [v for v in existing if isinstance(v, str) and mask_value(v) == value]
        if len(same) > 1:
            raise ValueError(f"{value!r} matches several stored values; keep their order or re-enter them")
        out.append(same[0] if same else value)
    return out


def live_state(channel: Channel | None, health: ChannelHealth | None, now: float) -> dict[str, Any]:
    if channel is None:
        return _quiet("not loaded", [])
    if health is None:
        keys = [{"key": mask_secret(k), "state": "ok", "lastError": ""} for k in channel.api_keys]
        return _quiet("idle" if channel.active else channel.status, keys)
    breaker = health.breaker
    if breaker.state.value != "closed" and not breaker.available(now):
        status = "circuit open"
    elif breaker.state.value == "half-open" or (breaker.state.value == "open" and breaker.available(now)):
        status = "probing"
    elif now < health.backoff_until:
        status = "backing off"
    else:
        status = "healthy"
    keys = []
    for key in channel.api_keys:
        kh = health.keys.get(key)
        if kh is None:
            keys.append({"key": mask_secret(key), "state": "ok", "lastError": ""})
            continue
        cooling = sorted(model for model, until in kh.cooldowns.items() if until > now)
        state = "disabled" if kh.disabled else "cooling down" if cooling else "ok"
        entry = {"key": mask_secret(key), "state": state, "lastError": kh.last_error}
        if cooling:
            entry["coolingModels"] = ", ".join(cooling)  # 429 cool-downs are per (key, model)
        keys.append(entry)
    usable = [k for k in keys if k["state"] == "ok"]
    if status == "healthy" and keys and not usable:
        status = "cooling down" if any(k["state"] == "cooling down" for k in keys) else "keys disabled"
    return {
        "health": status,
        "circuit": breaker.state.value,
        "requests": health.requests,
        "successRate": round(health.successes / health.requests, 4) if health.requests else None,
        "ttfbP50Ms": round(statistics.median(health.ttfb) * 1000, 1) if health.ttfb else None,
        "lastError": health.last_error,
        "keys": keys,
    }


def _quiet(health: str, keys: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "health": health,
        "circuit": "closed",
        "requests": 0,
        "successRate": None,
        "ttfbP50Ms": None,
        "lastError": "",
        "keys": keys,
    }
