"""Session affinity in Redis: a session's next request finds its channel on any host.

One key per session (``aff:<session>`` = ``t|<channel>`` or ``n|<channel>``, ``t`` when the
session carries thinking), expiring after the idle TTL (``ttlMs``, or ``thinkingTtlMs`` for
thinking sessions).  A lookup is one ``EVALSHA`` that also extends the TTL (the expiry is
idle time, as in the local table); a write happens only when the session's channel or its
thinking mark changes.  The local table stays the fallback when Redis is down and keeps
what this process saw.
"""

from __future__ import annotations

from ..affinity import SessionAffinity
from ..policy import AffinityPolicy
from .client import STATS, SharedDown, SharedStore

# KEYS: the session.  ARGV: ttl ms, thinking ttl ms.
LOOKUP = """
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, 1) == 't' then redis.call('PEXPIRE', KEYS[1], ARGV[2])
  else redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
end
return v
"""


class SharedAffinity(SessionAffinity):
    __slots__ = ("store", "_lookup", "_ttl_ms", "_thinking_ttl_ms")

    def __init__(self, policy: AffinityPolicy, store: SharedStore) -> None:
        super().__init__(policy)
        self.store = store
        self._lookup = store.script(LOOKUP)
        self._ttl_ms = max(1, int(self._ttl * 1000))
        self._thinking_ttl_ms = max(1, int(self._thinking_ttl * 1000))

    def _key(self, session: str) -> str:
        return self.store.key("aff", session)

    async def lookup(self, session: str, now: float) -> str | None:
        try:
            value = await self.store.eval(
                self._lookup, [self._key(session)], [self._ttl_ms, self._thinking_ttl_ms]
            )
        except SharedDown:
            STATS["fallbacks"] += 1
            return self.channel_for(session, now)
        if value is None:
            return self.channel_for(session, now)  # e.g. Redis restarted: what this process knows
        thinking, channel = value[:1] == b"t", str(value[2:].decode())
        self.adopt(session, channel, now, thinking)
        return channel

    def remember(self, session: str, channel: str, now: float, body: bytes = b"") -> None:
        before = self._sessions.get(session)
        super().remember(session, channel, now, body)
        thinking = self._sessions[session][2]  # as the local table decided it
        if before is None or before[0] != channel or before[2] != thinking:
            ttl = self._thinking_ttl_ms if thinking else self._ttl_ms
            self.store.send("SET", self._key(session), f"{'t' if thinking else 'n'}|{channel}", "PX", ttl)
