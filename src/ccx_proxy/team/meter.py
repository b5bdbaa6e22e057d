"""Token usage read from a response on its way to the client, never changing a byte.

Anthropic's stream reports usage twice: ``message_start`` carries
``message.usage`` (input, cache writes and reads, the first output count) and
``message_delta`` carries ``usage`` again, cumulative (``output_tokens``, and on
newer API versions and some providers the input and cache counts too).  The last
value seen for each field wins.  Cache writes are split by lifetime when the
upstream sends ``cache_creation`` (``ephemeral_5m_input_tokens`` /
``ephemeral_1h_input_tokens``); without it, ``cache_creation_input_tokens`` counts
as 5-minute writes (the API's default lifetime).

Per chunk the relay pays one substring search for ``"usage"`` and one check of the
chunk's last byte (in :mod:`ccx_proxy.stream`); only a chunk that holds the word, or that ends
inside a line, is looked at: its complete ``data:`` lines with ``"usage"`` are
parsed, and a line cut by a chunk boundary that may be a usage line is completed by the
next chunk (bounded; never a copy of the whole chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

_MARK = USAGE_MARK = b'"usage"'
_PARTIAL_LIMIT = 64 * 1024  # a data line longer than this is not usage: dropped
_UNDECIDED = 128  # a cut line shorter than this may still turn out to be a usage line


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    model: str | None = None  # as the upstream named it in its answer

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_write_5m
            + self.cache_write_1h
            + self.cache_read
        )

    def take(self, usage: Any) -> None:
        """Fold one ``usage`` object in (later values win)."""
        if not isinstance(usage, dict):
            return
        value = usage.get("input_tokens")
        if _count(value):
            self.input_tokens = value
        value = usage.get("output_tokens")
        if _count(value):
            self.output_tokens = value
        value = usage.get("cache_read_input_tokens")
        if _count(value):
            self.cache_read = value
        split = usage.get("cache_creation")
        if isinstance(split, dict):
            five, hour = split.get("ephemeral_5m_input_tokens"), split.get("ephemeral_1h_input_tokens")
            if _count(five):
                self.cache_write_5m = five
            if _count(hour):
                self.cache_write_1h = hour
        else:
            value = usage.get("cache_creation_input_tokens")
            if _count(value):
                self.cache_write_5m = value

    def take_message(self, doc: Any) -> None:
        """A whole Messages response (non-streaming JSON)."""
        if isinstance(doc, dict):
            model = doc.get("model")
            if isinstance(model, str):
                self.model = model[:256]
            self.take(doc.get("usage"))


def _count(value: Any) -> TypeGuard[int]:
    return type(value) is int and value >= 0


class UsageMeter:
    __slots__ = ("usage", "partial", "outcome")

    def __init__(self) -> None:
        self.usage = Usage()
        self.partial = b""  # the start of a line the next chunk completes
        self.outcome = "complete"  # the relay sets "stalled" / "upstream_cut" when it ends short

    def feed(self, chunk: bytes) -> None:
        """A chunk that holds the marker, ends inside a line, or completes a kept line.

        Works by index (no copy of the chunk): a line cut by the chunk's end is kept only
        when it can be a usage line (a ``data:`` line of a ``message_*`` event, one with the
        marker, or one too short to tell yet): content deltas, the bulk of a stream, are
        never copied."""
        start = 0
        if self.partial:
            nl = chunk.find(b"\n")
            if nl < 0:
                self._keep(self.partial + chunk)
                return
            self._line(self.partial + chunk[:nl])
            self.partial = b""
            start = nl + 1
        end = chunk.rfind(b"\n")
        at = chunk.find(_MARK, start, end) if end >= start else -1
        while at >= 0:  # only the lines that hold the marker (two per stream), found by index
            line_start = chunk.rfind(b"\n", start, at) + 1 or start
            line_end = chunk.find(b"\n", at, end + 1)
            self._line(chunk[line_start:line_end])
            at = chunk.find(_MARK, line_end, end)
        rest = max(end + 1, start)
        if rest < len(chunk):
            self._keep(chunk[rest:])

    def _keep(self, line: bytes) -> None:
        if len(line) < _UNDECIDED or (
            len(line) <= _PARTIAL_LIMIT
            and line.startswith(b"data:")
            and (b'"message_' in line or _MARK in line)
        ):
            self.partial = line
        else:
            self.partial = b""

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:") and _MARK in line:
            self._event(line[5:])

    def _event(self, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if doc.get("type") == "message_start":
            self.usage.take_message(doc.get("message"))
        else:
            self.usage.take(doc.get("usage"))

    def feed_json(self, body: bytes) -> None:
        """A non-streaming answer, read whole."""
        if _MARK not in body:
            return
        try:
            self.usage.take_message(orjson.loads(body))
        except orjson.JSONDecodeError:
            pass
