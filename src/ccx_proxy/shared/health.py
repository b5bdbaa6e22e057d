"""Upstream health shared by every instance: what one process learns, all of them apply.

Each process still decides on its own :class:`~ccx_proxy.health.HealthRegistry` (routing
reads no Redis), and tells the others when it learns something:

* a (key, model) cool-down after a 429, a key disabled by 401/402/403, a channel's 529
  back-off, a breaker (channel or key) that opened, and one that closed again;
* as a message on the ``health`` channel (applied by every other instance at once) and as a
  field of the ``health`` hash (read by an instance that starts later or reconnects;
  expired fields are dropped when read).

Keys are named by a fingerprint (the first 16 hex digits of their SHA-256), never by the
key.  Messages carry the seconds left (hosts with skewed clocks still agree); the hash keeps
wall-clock times (read by a process that starts later: that is where clock skew shows).

**One half-open probe across the fleet**: when a breaker lets its half-open probe through,
the process first claims it in Redis (``SET NX`` with a expiry); a process that loses the
claim treats the channel as unavailable, as it would while its own probe is out.  The
probe's verdict (closed, or opened again for longer) reaches everyone as a message.

The hot path pays nothing: every call here is on a failure path, a breaker transition or a
half-open probe.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Callable

import orjson

from ..config import Channel
from ..health import HealthRegistry, KeyHealth
from .client import SharedDown, SharedStore

log = logging.getLogger("ccx_proxy.shared")

REJECTED_FOR = 3600.0  # a rejected key is shared for an hour at most (a reload clears it)
CHANNEL = "health"
MAX_FIELDS = 2048  # entries of the health hash (expired ones are dropped to make room)
HASH_TTL = 86400  # the hash of a deployment that stopped learning anything goes away
LOST_FOR = 1.0  # seconds a process that lost a probe claim does not ask again
_FINGERPRINTS: dict[str, str] = {}

# Drop the fields of one kind (e.g. "rejected|") from the health hash.
FORGET = """
local n = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, string.len(ARGV[1])) == ARGV[1] then
    redis.call('HDEL', KEYS[1], field)
    n = n + 1
  end
end
return n
"""


# Record one entry in the health hash, bounded.  KEYS: the hash.  ARGV: field, until (wall s),
# max fields, now (wall s), hash TTL s.
TELL = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) <= tonumber(ARGV[4]) then redis.call('HDEL', KEYS[1], all[i]) end
  end
  if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# Give a probe claim back, if it is still this attempt's.  KEYS: the claim.  ARGV: its token.
UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def fingerprint(api_key: str) -> str:
    fp = _FINGERPRINTS.get(api_key)
    if fp is None:
        if len(_FINGERPRINTS) > 4096:
            _FINGERPRINTS.clear()
        fp = _FINGERPRINTS[api_key] = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return fp


class HealthSync:
    def __init__(
        self, store: SharedStore, registry: HealthRegistry, channels: Callable[[], tuple[Channel, ...]]
    ) -> None:
        self.store = store
        self.registry = registry
        self.channels = channels  # the running configuration's channels
        self._hash = store.key("health")
        self._forget = store.script(FORGET)
        self._record = store.script(TELL)
        self._unclaim = store.script(UNCLAIM)
        self._claims = itertools.count()
        self._lost: dict[str, float] = {}  # claim key -> until when another instance holds it
        store.subscribe(CHANNEL, self._message)
        store.on_up.append(self.resync)
        registry.sync = self

    # -- telling the others ---------------------------------------------------------------

    def _tell(self, kind: str, channel: str, api_key: str | None, model: str, until: float) -> None:
        left = until - self.registry.clock()
        wall = time.time() + left
        fp = fingerprint(api_key) if api_key else ""
        field = f"{kind}|{channel}|{fp}|{model}"
        store = self.store
        store.send_eval(
            self._record, [self._hash], [field, repr(wall), MAX_FIELDS, repr(time.time()), HASH_TTL]
        )
        # Messages carry what is left, not a time: hosts whose clocks differ still agree.
        store.publish(CHANNEL, orjson.dumps([store.instance, kind, channel, fp, model, left]))

    def cooled(self, channel: str, api_key: str, model: str, until: float) -> None:
        self._tell("cooled", channel, api_key, model, until)

    def rejected(self, channel: str, api_key: str) -> None:
        self._tell("rejected", channel, api_key, "", self.registry.clock() + REJECTED_FOR)

    def overloaded(self, channel: str, until: float) -> None:
        self._tell("overloaded", channel, None, "", until)

    def opened(self, channel: str, api_key: str | None, until: float) -> None:
        self._tell("opened", channel, api_key, "", until)

    def closed(self, channel: str, api_key: str | None) -> None:
        fp = fingerprint(api_key) if api_key else ""
        store = self.store
        store.send("HDEL", self._hash, f"opened|{channel}|{fp}|", f"overloaded|{channel}||")
        store.send("DEL", self._probe_key(channel, fp))
        store.publish(CHANNEL, orjson.dumps([store.instance, "closed", channel, fp, "", 0.0]))

    def reloaded(self) -> None:
        """A new configuration re-enables rejected keys: everywhere, and for later joiners."""
        if self.store.up:
            self.store.send_eval(self._forget, [self._hash], ["rejected|"])

    def _probe_key(self, channel: str, fp: str) -> str:
        return self.store.key("probe", channel, fp)

    async def claim_probe(self, channel: str, api_key: str | None, ttl: float) -> tuple[str, str] | None:
        """The claim (key, token) that lets this process send the half-open probe, None when
        another instance has one out; ``("", "")`` when Redis is down (each process then
        probes for itself).  The attempt gives the claim back however it ends
        (:meth:`release_probe`); ``ttl`` only bounds a claim whose process died."""
        key = self._probe_key(channel, fingerprint(api_key) if api_key else "")
        now = self.registry.clock()
        if self._lost.get(key, 0.0) > now:
            return None  # lost a moment ago: no round trip per request while the probe is out
        token = f"{self.store.instance}:{next(self._claims)}"
        try:
            won = await self.store.call("SET", key, token, "NX", "PX", max(1, int(ttl * 1000)))
        except SharedDown:
            return "", ""
        if won:
            self._lost.pop(key, None)
            return key, token
        if len(self._lost) > 1024:
            self._lost.clear()
        self._lost[key] = now + LOST_FOR
        return None

    def release_probe(self, key: str, token: str) -> None:
        if key:
            self.store.send_eval(self._unclaim, [key], [token])

    # -- learning from the others -------------------------------------------------------------

    def _message(self, data: bytes) -> None:
        instance, kind, channel, fp, model, left = orjson.loads(data)
        if instance != self.store.instance:
            self._apply(kind, channel, fp, model, time.time() + float(left))

    async def resync(self) -> None:
        """Everything the others learned while this process was away (or not yet started)."""
        fields = await self.store.call("HGETALL", self._hash)
        now = time.time()
        stale = []
        for raw_field, raw_wall in fields.items():
            field, wall = raw_field.decode(), float(raw_wall)
            if wall <= now:
                stale.append(field)
                continue
            kind, channel, fp, model = field.split("|", 3)
            self._apply(kind, channel, fp, model, wall)
        if stale:
            self.store.send("HDEL", self._hash, *stale)

    def _apply(self, kind: str, name: str, fp: str, model: str, wall: float) -> None:
        channel = next((c for c in self.channels() if c.name == name), None)
        if channel is None:
            return  # not a channel of this instance's configuration
        health = self.registry.channel(name, channel.breaker)
        until = self.registry.clock() + (wall - time.time())
        key: KeyHealth | None = None
        if fp:
            api_key = next((k for k in channel.api_keys if fingerprint(k) == fp), None)
            if api_key is None:
                return
            key = health.key(api_key, channel.breaker)
        if kind == "cooled" and key is not None and model:
            if key.cooling(model, self.registry.clock()) < until - self.registry.clock():
                key.cool_down(model, until)
                key.last_error = "rate limited (429), seen by another instance"
        elif kind == "rejected" and key is not None:
            key.disabled = True
            key.last_error = "rejected (401/402/403) on another instance: disabled until config reload"
        elif kind == "overloaded":
            health.backoff_until = max(health.backoff_until, until)
        elif kind == "opened":
            (key or health).breaker.opened_elsewhere(until)
        elif kind == "closed":
            (key or health).breaker.closed_elsewhere()
            if key is None:
                health.backoff_until = 0.0
