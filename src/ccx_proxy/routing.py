"""Which channels may serve a request, in which order.

A channel serves a model when it is active and its allowlist admits either the
requested name or the name its mapping table turns it into.  Candidates come in
``priority`` order (lowest first, file order breaking ties); an ``X-Channel``
pin narrows them to one channel; session affinity moves the session's channel
to the front while it is healthy.
"""

from __future__ import annotations

from typing import NamedTuple

from .catalog import served_ids
from .config import Channel, GatewayConfig
from .errors import InvalidRequest, ModelNotFound

# The memo of answers by requested name keeps only names some channel serves (any string
# can miss, so a miss is never remembered); it is bounded in entries and in the UTF-8 bytes
# of its keys, and cleared when either bound would be passed.  A name longer than
# _MEMO_LONGEST bytes is never remembered (the body check refuses those before routing).
_MEMO_LIMIT = 4096
_MEMO_BYTES = 1 << 20
_MEMO_LONGEST = 256


class Candidate(NamedTuple):
    channel: Channel
    model: str  # the name to send upstream


class Router:
    __slots__ = ("_active", "_by_name", "_memo", "_memo_bytes", "_served")

    def __init__(self, config: GatewayConfig) -> None:
        self._active = config.active
        self._served = served_ids(config)  # what a model_not_found names (GET /v1/models)
        self._by_name = {c.name: c for c in config.channels}
        self._memo: dict[str, tuple[Candidate, ...]] = {}
        self._memo_bytes = 0  # UTF-8 bytes of _memo's keys

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
        if result and len(model) <= _MEMO_LONGEST:  # a character is at least a byte
            self._remember(model, result)
        return result

    def _remember(self, model: str, result: tuple[Candidate, ...]) -> None:
        size = len(model.encode("utf-8", "surrogatepass"))
        if size > _MEMO_LONGEST:
            return
        if len(self._memo) >= _MEMO_LIMIT or self._memo_bytes + size > _MEMO_BYTES:
            self._memo.clear()
            self._memo_bytes = 0
        self._memo[model] = result
        self._memo_bytes += size

    def route(self, model: str, pinned: str | None = None) -> tuple[Candidate, ...]:
        """Candidates for ``model``; raises when there are none."""
        if pinned is not None:
            return (self._pinned(model, pinned),)
        found = self.candidates(model)
        if not found:
            raise ModelNotFound(model, self._served)
        return found

    def _pinned(self, model: str, name: str) -> Candidate:
        channel = self._by_name.get(name)
        if channel is None:
            raise InvalidRequest(f"X-Channel: no channel named {name!r}")
        if not channel.active:
            raise InvalidRequest(f"X-Channel: channel {name!r} is {channel.status}")
        for candidate in self.candidates(model):
            if candidate.channel is channel:
                return candidate
        raise ModelNotFound(model, self._served)


def prefer(candidates: tuple[Candidate, ...], channel_name: str) -> tuple[Candidate, ...]:
    """The same candidates with ``channel_name``'s first (affinity)."""
    if not candidates or candidates[0].channel.name == channel_name:
        return candidates
    for i, candidate in enumerate(candidates):
        if candidate.channel.name == channel_name:
            return (candidate, *candidates[:i], *candidates[i + 1 :])
    return candidates
