"""Which channel serves a request.

A channel serves a model when it is active and its allowlist admits either the
requested name or the name its mapping table turns it into.  Candidates come in
``priority`` order (lowest first, file order breaking ties).
"""

from __future__ import annotations

from typing import NamedTuple

from .config import Channel, GatewayConfig

_MEMO_LIMIT = 4096


class Candidate(NamedTuple):
    channel: Channel
    model: str  # the name to send upstream


class Router:
    __slots__ = ("_active", "_memo")

    def __init__(self, config: GatewayConfig) -> None:
        self._active = config.active
        self._memo: dict[str, tuple[Candidate, ...]] = {}

    def candidates(self, model: str) -> tuple[Candidate, ...]:
        hit = self._memo.get(model)
        if hit is not None:
            return hit
        found = []
        for channel in self._active:
            mapped = channel.models.lookup(model)
            if channel.serves(model, mapped):
                found.append(Candidate(channel, mapped))
        result = tuple(found)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[model] = result
        return result
