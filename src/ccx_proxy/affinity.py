"""Session affinity: requests of one session stick to the channel that served it.

Keeps the upstream's prompt cache warm, and keeps thinking blocks signed by one
provider away from another.  The session is ``X-Claude-Code-Session-Id``, else
the body's ``metadata.user_id``.  Entries expire after an idle TTL; the table is
bounded (least recently used first out).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

from .policy import AffinityPolicy

SESSION_HEADER = "x-claude-code-session-id"
_MAX_ID = 256
# metadata.user_id in a body orjson or the upstream will validate; a hint only.
_USER_ID = re.compile(
    rb'"metadata"[ \t\r\n]*:[ \t\r\n]*\{[^{}]*?"user_id"[ \t\r\n]*:[ \t\r\n]*"([^"\\]{1,256})"'
)


def session_of(headers: Mapping[str, str], body: bytes) -> str | None:
    value = headers.get(SESSION_HEADER)
    if value:
        return "h:" + value[:_MAX_ID]
    if b'"user_id"' not in body:
        return None
    match = _USER_ID.search(body)
    return "u:" + match.group(1).decode("utf-8", "replace") if match else None


def carries_thinking(body: bytes) -> bool:
    """Whether a request asks for or carries thinking: the ``thinking`` parameter or a
    ``thinking`` / ``redacted_thinking`` block (one substring search; a hint only)."""
    return b'thinking"' in body


class SessionAffinity:
    """Session -> (channel, last seen, carries thinking), idle-expired, LRU-bounded.

    A session whose requests carry thinking is kept for ``thinkingTtlMs`` (default a
    day) rather than ``ttlMs``: its history holds thinking blocks signed by the channel's
    provider, which another provider may refuse, so it returns to that channel even after
    a long pause.  Once marked, a session stays marked (its history keeps the blocks).
    """

    __slots__ = ("policy", "_ttl", "_thinking_ttl", "_sessions")

    def __init__(self, policy: AffinityPolicy) -> None:
        self.policy = policy
        self._ttl = policy.ttlMs / 1000
        self._thinking_ttl = max(policy.thinkingTtlMs, policy.ttlMs) / 1000
        self._sessions: OrderedDict[str, tuple[str, float, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expired(self, entry: tuple[str, float, bool], now: float) -> bool:
        return now - entry[1] > (self._thinking_ttl if entry[2] else self._ttl)

    def channel_for(self, session: str, now: float) -> str | None:
        entry = self._sessions.get(session)
        if entry is None:
            return None
        if self._expired(entry, now):
            del self._sessions[session]
            return None
        return entry[0]

    async def lookup(self, session: str, now: float) -> str | None:
        """:meth:`channel_for`, awaited (the shared table in Redis answers over the network)."""
        return self.channel_for(session, now)

    def adopt(self, session: str, channel: str, now: float, thinking: bool) -> None:
        """What the shared table says of ``session`` (ccx_proxy.shared.affinity)."""
        entry = self._sessions.get(session)
        self._sessions[session] = (channel, now, thinking or (entry is not None and entry[2]))
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.policy.maxSessions:
            self._sessions.popitem(last=False)

    def remember(self, session: str, channel: str, now: float, body: bytes = b"") -> None:
        """``channel`` served ``session`` at ``now``; ``body`` is the request (for thinking)."""
        sessions = self._sessions
        entry = sessions.get(session)
        thinking = (entry is not None and entry[2]) or carries_thinking(body)
        sessions[session] = (channel, now, thinking)
        sessions.move_to_end(session)
        while len(sessions) > self.policy.maxSessions:
            sessions.popitem(last=False)
        # Drop a few expired entries from the cold end on each write: bounded work.
        for _ in range(2):
            oldest = next(iter(sessions.values()), None)
            if oldest is None or not self._expired(oldest, now):
                break
            sessions.popitem(last=False)
