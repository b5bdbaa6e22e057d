"""Channel presets per provider: the console's "Start from a preset" and ``channels.example.json``.

One source: the console reads these from ``GET /api/messages/info``, and a test checks that
``channels.example.json`` holds the same channels.  Each is a channel object as in
``channels.json`` (without ``priority`` and ``status``), with the auth header, model mapping and
thinking options its provider needs.  Checked against the providers' documentation on
:data:`CHECKED` (model names change: a provider's own ``GET /v1/models`` is the final word):

* Anthropic: ids pass through; thinking signatures it minted stay valid only there, so
  ``strip-foreign`` drops the others when a session arrives from another provider.
* DeepSeek (api-docs.deepseek.com, "Anthropic API"): ``x-api-key`` accepted; ``deepseek-v4-pro``
  and ``deepseek-flash`` (``deepseek-chat`` / ``deepseek-reasoner`` retired 2026-07-24).  Thinking
  is on by default, unsigned, and must be passed back on tool-use turns; ``redacted_thinking``
  is not supported.
* Kimi For Coding (``api.kimi.com/coding``): ``kimi-for-coding``; it answers 403 to clients that
  are not coding agents (by User-Agent), which the gateway passes through untouched.
* GLM (Zhipu, ``open.bigmodel.cn``; international ``api.z.ai/api/anthropic``): Bearer auth as in
  Z.ai's Claude Code guide; ``glm-5``, ``glm-4.7``, ``glm-4.5-air``.

Non-Anthropic presets strip Claude Code's attribution line (``stripBillingBlock``), which
differs per conversation and keeps those upstreams from sharing a cached system prompt.
"""

from __future__ import annotations

from typing import Any

CHECKED = "2026-11-27"

_CLAUDE = {"serviceType": "claude"}
_FOREIGN = {"thinkingSignatures": "strip-foreign"}

PRESETS: dict[str, dict[str, Any]] = {
    "anthropic": {
        "label": "Anthropic",
        "channel": {
            "name": "anthropic",
            **_CLAUDE,
            "baseUrl": "https://api.anthropic.com",
            "apiKeys": ["${ANTHROPIC_UPSTREAM_API_KEY}"],
            "authHeader": "x-api-key",
            "modelMapping": {},
            "supportedModels": ["claude-*"],
            **_FOREIGN,
        },
    },
    "deepseek": {
        "label": "DeepSeek",
        "channel": {
            "name": "deepseek",
            **_CLAUDE,
            "baseUrl": "https://api.deepseek.com/anthropic",
            "apiKeys": ["${DEEPSEEK_API_KEY}"],
            "authHeader": "x-api-key",
            "modelMapping": {
                "opus": "deepseek-v4-pro",
                "sonnet": "deepseek-v4-pro",
                "haiku": "deepseek-flash",
            },
            **_FOREIGN,
            "thinkingPassback": True,
            "stripBillingBlock": True,
        },
    },
    "kimi": {
        "label": "Kimi",
        "channel": {
            "name": "kimi",
            **_CLAUDE,
            "baseUrl": "https://api.kimi.com/coding/",
            "apiKeys": ["${KIMI_API_KEY}"],
            "authHeader": "x-api-key",
            "modelMapping": dict.fromkeys(("opus", "sonnet", "haiku"), "kimi-for-coding"),
            **_FOREIGN,
            "stripBillingBlock": True,
        },
    },
    "glm": {
        "label": "GLM",
        "channel": {
            "name": "glm",
            **_CLAUDE,
            "baseUrl": "https://open.bigmodel.cn/api/anthropic",
            "apiKeys": ["${GLM_API_KEY}"],
            "authHeader": "bearer",
            "modelMapping": {"opus": "glm-5", "sonnet": "glm-4.7", "haiku": "glm-4.5-air"},
            **_FOREIGN,
            "stripBillingBlock": True,
        },
    },
}
