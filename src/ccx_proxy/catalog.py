"""The ``/v1/models`` catalogue: exactly the Claude-style ids a request would be served for.

Per active channel, in priority order, deduplicated:

1. its advertised ids (``models``), if it has any;
2. else its exact ``supportedModels`` entries;
3. else the current Claude Code ids (:data:`CLAUDE_CODE_MODELS`) its ``modelMapping`` covers
   (every one of them when it has no mapping: it passes names through unchanged).

Each candidate is kept only if the channel serves it (its allowlist admits the id or the
mapped name), so the list never names an id a request would be refused for, and never a bare
mapping key such as ``opus`` (Claude Code keys its model-family logic on
``claude-{family}-{major}-{minor}`` ids, and its picker shows only ids starting with
``claude`` or ``anthropic``).  ``created_at`` comes from this module, never from the clock,
so the list is the same across restarts.
"""

from __future__ import annotations

from typing import Any

import orjson

from .config import Channel, GatewayConfig
from .errors import InvalidRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000

# The current Claude Code model ids, newest first within each family: (id, display name,
# created_at).  Source: the model table built into Claude Code 2.1.197 (its first-party ids,
# read from the installed CLI on 2026-11-27; Anthropic's "Models overview" page names the
# same families).  The 4.5 generation's dates are those of its dated snapshot ids (e.g.
# claude-sonnet-4-5-20250929); the newer ones carry TABLE_CHECKED, the day this table was
# last checked.  Review it when Claude Code adds a model.
TABLE_CHECKED = "2026-11-27T00:00:00Z"
CLAUDE_CODE_MODELS: tuple[tuple[str, str, str], ...] = (
    ("claude-opus-4-8", "Claude Opus 4.8", TABLE_CHECKED),
    ("claude-opus-4-7", "Claude Opus 4.7", TABLE_CHECKED),
    ("claude-opus-4-6", "Claude Opus 4.6", TABLE_CHECKED),
    ("claude-opus-4-5", "Claude Opus 4.5", "2025-11-01T00:00:00Z"),
    ("claude-sonnet-5", "Claude Sonnet 5", TABLE_CHECKED),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", TABLE_CHECKED),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
)
_KNOWN = {model_id: (name, stamp) for model_id, name, stamp in CLAUDE_CODE_MODELS}
# created_at for ids not in the table (advertised or allowlisted ones): fixed, so stable.
OTHER_CREATED_AT = TABLE_CHECKED


def channel_ids(channel: Channel) -> tuple[str, ...]:
    """The ids GET /v1/models lists for ``channel`` (see the module's docstring)."""
    if channel.advertised_models:
        candidates: tuple[str, ...] = channel.advertised_models
    elif exact := channel.allowlist.exact_names():
        candidates = exact
    else:
        keys = channel.models.keys()
        candidates = tuple(
            model_id
            for model_id, _, _ in CLAUDE_CODE_MODELS
            if not keys or any(key in model_id for key in keys)
        )
    return tuple(m for m in dict.fromkeys(candidates) if channel.serves(m, channel.models.lookup(m)))


def served_ids(config: GatewayConfig) -> tuple[str, ...]:
    """Every id the catalogue lists, in order: the active channels' :func:`channel_ids`."""
    names: dict[str, None] = {}
    for channel in config.active:
        for name in channel_ids(channel):
            names.setdefault(name, None)
    return tuple(names)


def model_entry(model_id: str) -> dict[str, Any]:
    name, stamp = _KNOWN.get(model_id, (model_id, OTHER_CREATED_AT))
    return {"type": "model", "id": model_id, "display_name": name, "created_at": stamp}


class ModelCatalog:
    __slots__ = ("ids", "_entries", "_index", "_default_page")

    def __init__(self, config: GatewayConfig) -> None:
        self.ids = served_ids(config)
        self._entries: tuple[dict[str, Any], ...] = tuple(model_entry(m) for m in self.ids)
        self._index = {e["id"]: e for e in self._entries}
        self._default_page = orjson.dumps(self._page(0, DEFAULT_LIMIT))

    def entry(self, model_id: str) -> dict[str, Any] | None:
        return self._index.get(model_id)

    def page(self, query: dict[str, str]) -> bytes:
        """One page of the list, honouring ``limit``, ``after_id`` and ``before_id``."""
        if not query:
            return self._default_page
        raw_limit = query.get("limit", str(DEFAULT_LIMIT))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise InvalidRequest(f"limit: must be an integer between 1 and {MAX_LIMIT}")
        limit = int(raw_limit)
        if "after_id" in query:
            start = self._position(query["after_id"], "after_id") + 1
            return orjson.dumps(self._page(start, start + limit))
        if "before_id" in query:
            end = self._position(query["before_id"], "before_id")
            start = max(0, end - limit)
            # Paging backwards, "more" lies before the page.
            return orjson.dumps(self._page(start, end, has_more=start > 0))
        return orjson.dumps(self._page(0, limit))

    def _position(self, model_id: str, name: str) -> int:
        try:
            return self.ids.index(model_id)
        except ValueError:
            raise InvalidRequest(f"{name}: unknown model id {model_id!r}") from None

    def _page(self, start: int, end: int, has_more: bool | None = None) -> dict[str, Any]:
        data = list(self._entries[start:end])
        return {
            "data": data,
            "has_more": end < len(self._entries) if has_more is None else has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
