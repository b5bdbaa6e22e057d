"""The ``/v1/models`` catalogue: the model names the active channels answer to.

Built once per configuration from the mapping keys and the exact allowlist
entries, deduplicated, in priority order, and served in Anthropic's list format.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from .config import GatewayConfig
from .errors import InvalidRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


class ModelCatalog:
    __slots__ = ("_entries", "_index", "_default_page")

    def __init__(self, config: GatewayConfig, created_at: datetime | None = None) -> None:
        stamp = (created_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        names: dict[str, None] = {}
        for channel in config.active:
            for name in (*channel.models.keys(), *channel.allowlist.exact_names()):
                names.setdefault(name, None)
        self._entries: tuple[dict[str, Any], ...] = tuple(
            {"type": "model", "id": n, "display_name": n, "created_at": stamp} for n in names
        )
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
        ids = [e["id"] for e in self._entries]
        if "after_id" in query:
            start = self._position(ids, query["after_id"], "after_id") + 1
            return orjson.dumps(self._page(start, start + limit))
        if "before_id" in query:
            end = self._position(ids, query["before_id"], "before_id")
            start = max(0, end - limit)
            # Paging backwards, "more" lies before the page.
            return orjson.dumps(self._page(start, end, has_more=start > 0))
        return orjson.dumps(self._page(0, limit))

    @staticmethod
    def _position(ids: list[str], model_id: str, name: str) -> int:
        try:
            return ids.index(model_id)
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
