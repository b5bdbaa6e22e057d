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


class SessionAffinity:
    __slots__ = ("policy", "_ttl", "_sessions")

    def __init__(self, policy: AffinityPolicy) -> None:
        self.policy = policy
        self._ttl = policy.ttlMs / 1000
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def channel_for(self, session: str, now: float) -> str | None:
        entry = self._sessions.get(session)
        if entry is None:
            return None
        if now - entry[1] > self._ttl:
            del self._sessions[session]
            return None
        return entry[0]

    def remember(self, session: str, channel: str, now: float) -> None:
        sessions = self._sessions
        sessions[session] = (channel, now)
        sessions.move_to_end(session)
        while len(sessions) > self.policy.maxSessions:
            sessions.popitem(last=False)
        # Drop a few expired entries from the cold end on each write: bounded work.
        for _ in range(2):
            oldest = next(iter(sessions.items()), None)
            if oldest is None or now - oldest[1][1] <= self._ttl:
                break
            sessions.popitem(last=False)
