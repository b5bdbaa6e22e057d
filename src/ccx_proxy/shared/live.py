"""Every instance's live numbers, merged for the console's Overview; the Redis connection's own.

Each process (a ``--workers N`` worker counts as one) publishes **its own** numbers, never
a host-wide multiprocess sum, so the merge counts every process exactly once::

    every PUBLISH_INTERVAL (one script, off the request pipeline, Redis's clock):
        SET  <prefix>live:<id> <snapshot> PX <TTL>
        ZADD <prefix>live:index <now> <id>;  ZREMRANGEBYSCORE ... older than TTL
    GET /api/overview (its own round trips, READ_TIMEOUT for all of them, never the
    request pipeline's batch): the ids published within TTL, then MGETs of the others'
    snapshots in chunks, at most MAX_INSTANCES of them and MAX_READ_BYTES in all (more:
    omitted, counted in ``instancesOmitted``, said in ``notice`` and logged at most once
    a minute); this process's own numbers are taken fresh from memory

The index holds only the ids published within :data:`TTL` (every publisher trims it), so
it stays bounded without readers.  ``<id>`` is the store's instance id; a process whose
snapshot may have expired (none stored for about :data:`TTL`: Redis down, a stalled loop)
goes on under a new one (``<instance>~<n>``) that publishes only what it counted since its
last stored snapshot, and drops the old key: an id that left never comes back, and what
the old id published is not counted twice.

A snapshot is one JSON object, per channel: requests, errors (5xx, 429, streams cut after
their start: the Overview's definition), cumulative TTFB and duration buckets, tokens by
type, cost, upstream attempts by verdict, availability; and the streams in flight.  It is
bounded by the metrics' label caps (at most 201 channels, a fixed set of numbers each) and
by :data:`MAX_BYTES`.  An instance that dies stops refreshing its key: it is gone from the
list within :data:`TTL`; one that stops cleanly deletes it at once.

**The merged view** (``/api/overview`` on any instance while Redis answers):

* counters and the TTFB buckets are summed over the instances (in a worker thread, beside
  the event loop; the duration buckets are published, not merged); an instance that went away
  keeps contributing the numbers it last published (counters must not run backwards, or
  the rates over the last minute would): kept one by one for :data:`GRACE` × TTL, then
  added into one running sum of the departed and dropped, so ``totals.requests`` counts
  every request of the instances this process has seen since it started watching, and an
  Overview costs O(live instances);
* streams in flight: the sum over the live instances;
* availability: a channel is available only where **every** live instance can use it (the
  worst view, as the ``--workers`` gauges do): one instance backing off shows;
* ``instances``: each live one read (id, host, pid, age of its snapshot, streams, whether
  its Redis was up), this process first; ``instancesOmitted``: live ones not read (their
  last numbers still count).

Redis down (or too slow for an overview's read): the Overview shows this host's numbers
(every worker's through the multiprocess files, or this process's) with ``redis: "down"``
and a ``notice`` the console shows; each such answer counts as a fallback.

``/metrics`` gains, per process (summed over the workers by the multiprocess collector;
``ccx_redis_up`` is 1 only when every worker's connection is up): ``ccx_redis_up``,
``ccx_redis_errors_total``, ``ccx_redis_fallbacks_total``, ``ccx_redis_state_changes_total``,
``ccx_redis_dropped_total``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..ops.metrics import (
    DURATION_BUCKETS,
    EXPORTER,
    TOKEN_TYPES,
    TTFB_BUCKETS,
    Exporter,
    Snapshot,
    build_families,
)
from ..tasks import cancel_and_wait
from .client import STATS, SharedDown, SharedStore

if TYPE_CHECKING:
    from ..state import Gateway

log = logging.getLogger("ccx_proxy.shared.live")

VERSION = 1  # the snapshot's layout; others are skipped
PUBLISH_INTERVAL = 1.0  # seconds between two snapshots of one process
TTL = 5.0  # seconds a snapshot lives: an instance that dies leaves the list within this
MAX_BYTES = 256 * 1024  # a bigger snapshot is not published (the label caps keep it far below)
MAX_INSTANCES = 256  # others' snapshots one overview reads (more: omitted, with a note)
MAX_READ_BYTES = 4 * 1024 * 1024  # snapshot bytes one overview reads, at most (+ one MAX_BYTES)
MAX_LISTED = 4096  # ids one overview lists (the index holds those published within TTL)
READ_CHUNK = 16  # snapshots per MGET
READ_TIMEOUT = 1.0  # seconds for an overview's whole read (its own round trips, not the pipeline's)
PUBLISH_TIMEOUT = 1.0  # seconds for one publish (its own round trip, not the pipeline's)
GRACE = 2.0  # TTLs a departed instance is kept one by one, then folded into the departed sum
MAX_REMEMBERED = 1024  # instances kept one by one (beyond: folded, oldest first)
NEW_ID_AFTER = 0.8  # TTLs without a stored snapshot after which a process publishes under a new id
OMITTED_LOG_EVERY = 60.0  # seconds: omitted instances are logged at most this often
NOTICE = "Redis down: this host only"
INF = float("inf")
TTFB_LE = (*TTFB_BUCKETS, INF)
DURATION_LE = (*DURATION_BUCKETS, INF)
COUNTERS = ("n", "e", "usd")  # per channel, summed
VECTORS = {"ttfb": len(TTFB_LE), "dur": len(DURATION_LE), "tok": len(TOKEN_TYPES)}  # per channel
SUMMED = {"ttfb": VECTORS["ttfb"], "tok": VECTORS["tok"]}  # those the merged view shows

HELP = {
    "ccx_redis_up": "1 while this process's Redis connection answers (REDIS_URL); with workers, 1 only "
    "when every worker's does.",
    "ccx_redis_errors": "Redis round trips that failed or timed out.",
    "ccx_redis_fallbacks": "Decisions taken on local state because Redis was down.",
    "ccx_redis_state_changes": "The Redis connection going down or coming back up.",
    "ccx_redis_dropped": "Fire-and-forget Redis commands not sent (Redis down, or the queue full).",
}

Channels = dict[str, dict[str, Any]]

# KEYS: the index, this snapshot's key, a previous id's key (or this one again).  ARGV: the
# id, the snapshot, its TTL in ms, the previous id ('': none).  Redis's clock scores the
# index, so hosts whose clocks differ agree on what is older than the TTL.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[4] ~= '' then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[1], ARGV[4])
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl))
return 1
"""

# KEYS: the index.  ARGV: the TTL in ms, the most ids to return.  Returns {how many were
# published within the TTL, those ids (at most ARGV[2])}.
LIST = """
local t = redis.call('TIME')
local since = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[1])
return {redis.call('ZCOUNT', KEYS[1], since, '+inf'),
        redis.call('ZRANGE', KEYS[1], since, '+inf', 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))}
"""


def redis_families(store: SharedStore) -> Iterable[Metric]:
    """The connection's numbers, for ``/metrics`` (this process's: :data:`client.STATS`)."""
    yield GaugeMetricFamily("ccx_redis_up", HELP["ccx_redis_up"], value=1.0 if store.up else 0.0)
    for name, stat in (
        ("ccx_redis_errors", "errors"),
        ("ccx_redis_fallbacks", "fallbacks"),
        ("ccx_redis_state_changes", "transitions"),
        ("ccx_redis_dropped", "dropped"),
    ):
        yield CounterMetricFamily(name, HELP[name], value=STATS[stat])


# ------------------------------------------------------------------ one process's snapshot


def _cumulative(by_le: dict[float, float], bounds: tuple[float, ...]) -> list[int]:
    return [int(by_le.get(le, 0.0)) for le in bounds]


def own_channels(families: Iterable[Metric]) -> tuple[Channels, int]:
    """This process's numbers by channel, and its streams in flight, from its own families."""
    families = list(families)
    snap = Snapshot.of(families, 0.0, 0.0)  # requests and errors exactly as the Overview counts them
    channels: Channels = {}

    def of(name: str) -> dict[str, Any]:
        row = channels.get(name)
        if row is None:
            row = channels[name] = {"n": 0, "e": 0}
        return row

    for name, count in snap.requests.items():
        of(name)["n"] = int(count)
    for name, count in snap.errors.items():
        of(name)["e"] = int(count)
    for name, ok in snap.available.items():
        of(name)["ok"] = int(ok == 1.0)
    durations: dict[str, dict[float, float]] = {}
    for family in families:
        for sample in family.samples:
            channel = sample.labels.get("channel", "")
            if sample.name == "ccx_request_duration_seconds_bucket":
                durations.setdefault(channel, {})[float(sample.labels["le"])] = sample.value
            elif sample.name == "ccx_tokens_total":
                kind = sample.labels.get("type", "")
                if kind in TOKEN_TYPES:
                    tokens = of(channel).setdefault("tok", [0] * len(TOKEN_TYPES))
                    tokens[TOKEN_TYPES.index(kind)] += int(sample.value)
            elif sample.name == "ccx_cost_usd_total":
                row = of(channel)
                row["usd"] = round(row.get("usd", 0.0) + sample.value, 6)
            elif sample.name == "ccx_upstream_attempts_total" and sample.value:
                attempts = of(channel).setdefault("att", {})
                outcome = sample.labels.get("outcome", "")
                attempts[outcome] = attempts.get(outcome, 0) + int(sample.value)
    for name, by_le in snap.ttfb.items():
        of(name)["ttfb"] = _cumulative(by_le, TTFB_LE)
    for name, by_le in durations.items():
        of(name)["dur"] = _cumulative(by_le, DURATION_LE)
    return channels, int(snap.streams)


# ------------------------------------------------------------------ merging


def _add(total: Channels, channels: Channels) -> None:
    """``channels``' counters and buckets added to ``total`` (shapes that do not fit: skipped)."""
    for name, row in channels.items():
        if not isinstance(row, dict):
            continue
        into = total.get(name)
        if into is None:
            into = total[str(name)] = {}
        for field in COUNTERS:
            value = row.get(field)
            if isinstance(value, int | float):
                into[field] = into.get(field, 0) + value
        for field, size in SUMMED.items():
            vector = row.get(field)
            if isinstance(vector, list) and len(vector) == size:
                acc = into.get(field)
                if acc is None:
                    into[field] = [v if isinstance(v, int | float) else 0 for v in vector]
                else:
                    for i, value in enumerate(vector):
                        if isinstance(value, int | float):
                            acc[i] += value
        attempts = row.get("att")
        if isinstance(attempts, dict):
            acc_att = into.setdefault("att", {})
            for outcome, value in attempts.items():
                if isinstance(value, int | float):
                    acc_att[outcome] = acc_att.get(outcome, 0) + value


def _since(channels: Channels, base: Channels) -> Channels:
    """``channels``' counters less ``base``'s (what was counted after ``base`` was taken);
    availability as in ``channels``."""
    out: Channels = {}
    for name, row in channels.items():
        before = base.get(name)
        if not before:
            out[name] = row
            continue
        row = dict(row)
        for field in COUNTERS:
            if field in row and field in before:
                row[field] = row[field] - before[field]
        if "usd" in row:
            row["usd"] = round(row["usd"], 6)
        for field in VECTORS:
            if field in row and field in before:
                row[field] = [now - then for now, then in zip(row[field], before[field], strict=False)]
        if "att" in row and "att" in before:
            row["att"] = {k: v - before["att"].get(k, 0) for k, v in row["att"].items()}
        out[name] = row
    return out


class Merger:
    """Every instance this process has seen, for counters that never run backwards: the
    live ones' latest numbers and the departed ones' last, one by one for ``grace``
    seconds after they were last seen (or until more than :data:`MAX_REMEMBERED`), then
    added into :attr:`departed`, one running sum, and dropped.  :meth:`totals` costs
    O(instances seen within the grace), not O(every instance ever seen)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.known: dict[str, tuple[Channels, float]] = {}  # id -> (channels, last seen, monotonic)
        self.departed: Channels = {}
        self.folded = 0  # instances added into :attr:`departed`

    def see(self, instance: str, channels: Channels, mono: float) -> None:
        self.known.pop(instance, None)  # re-inserted: the dict stays ordered by last sight
        self.known[instance] = (channels, mono)

    def touch(self, instance: str, mono: float) -> None:
        """Still there (listed), though not read this time: its last numbers stay its own."""
        seen = self.known.pop(instance, None)
        if seen is not None:
            self.known[instance] = (seen[0], mono)

    def fold(self, mono: float) -> None:
        known = self.known
        while known:
            oldest = next(iter(known))
            channels, seen = known[oldest]
            if seen >= mono - self.grace and len(known) <= MAX_REMEMBERED:
                break
            _add(self.departed, channels)
            del known[oldest]
            self.folded += 1

    def totals(self, mono: float) -> Channels:
        self.fold(mono)
        total: Channels = {}
        _add(total, self.departed)
        for channels, _ in self.known.values():
            _add(total, channels)
        return total


def merged_snapshot(totals: Channels, live: list[dict[str, Any]], mono: float, wall: float) -> Snapshot:
    """The Overview's snapshot: counters from ``totals``; streams and availability from the
    ``live`` instances (streams summed, a channel available only where every one says so)."""
    snap = Snapshot(mono, wall)
    for name, row in totals.items():
        snap.requests[name] = float(row.get("n", 0))
        snap.errors[name] = float(row.get("e", 0))
        ttfb = row.get("ttfb")
        if ttfb is not None:
            snap.ttfb[name] = dict(zip(TTFB_LE, map(float, ttfb), strict=True))
        tokens = row.get("tok")
        if tokens is not None:
            snap.output[name] = float(tokens[TOKEN_TYPES.index("output")])
    for instance in live:
        streams = instance.get("streams")
        if isinstance(streams, int | float):
            snap.streams += streams
        for name, row in instance["ch"].items():
            ok = row.get("ok") if isinstance(row, dict) else None
            if isinstance(ok, int | float):
                snap.available[name] = min(snap.available.get(name, 1.0), float(ok))
    return snap


def fleet_totals(totals: Channels) -> dict[str, Any]:
    """Tokens, cost and upstream attempts summed over every channel and instance."""
    tokens = [0] * len(TOKEN_TYPES)
    attempts: dict[str, int] = {}
    cost = 0.0
    for row in totals.values():
        for i, n in enumerate(row.get("tok") or ()):
            tokens[i] += int(n)
        for outcome, n in (row.get("att") or {}).items():
            attempts[outcome] = attempts.get(outcome, 0) + int(n)
        cost += row.get("usd", 0.0)
    return {
        "tokens": dict(zip(TOKEN_TYPES, tokens, strict=True)),
        "costUsd": round(cost, 6),
        "attempts": attempts,
    }


# ------------------------------------------------------------------ the feed


class LiveFeed:
    """Publishes this process's snapshot and answers the Overview with everyone's
    (:class:`ccx_proxy.ops.metrics.Fleet`)."""

    def __init__(self, store: SharedStore, exporter: Exporter) -> None:
        self.store = store
        self.exporter = exporter
        self.interval = PUBLISH_INTERVAL
        self.ttl = TTL
        self.ttl_ms = int(TTL * 1000)
        self.index = store.key("live", "index")  # a ZSET (before: a SET named live:instances)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.merger = Merger(GRACE * TTL)
        self.id = store.instance  # what this process publishes under (a new one after a gap)
        self._generation = 0
        self._base: Channels = {}  # counted before this id: published under the earlier ones
        self._stored: tuple[float, Channels] | None = None  # the last snapshot stored: when, what
        self._previous = ""  # the id before a gap, until its key is deleted
        self._publishing = False
        self._reading = asyncio.Lock()  # one overview read at a time: sightings stay in order
        self._reads: set[asyncio.Task[tuple[Snapshot | None, dict[str, Any]]]] = set()
        self._too_big = False
        self._omitted_logged = -1e9
        self._bad: set[str] = set()  # instances whose snapshot could not be read (logged once)
        self._task: asyncio.Task[None] | None = None

    def key(self, instance: str) -> str:
        return self.store.key("live", instance)

    def mine(self, instance: str) -> bool:
        """``instance`` is this process (under its id of now or of before a gap)."""
        me = self.store.instance
        return instance == me or instance.startswith(me + "~")

    def own(self) -> dict[str, Any]:
        """This process's snapshot: every number it counted since it started."""
        channels, streams = own_channels(build_families(self.exporter.meter, self.exporter.live))
        return {
            "v": VERSION,
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "t": round(time.time(), 3),
            "redis": self.store.up,
            "streams": streams,
            "ch": channels,
        }

    async def publish(self) -> None:
        """This process's snapshot (nothing while Redis is down), through its own round trip."""
        store = self.store
        if not store.up or self._publishing:
            return
        self._publishing = True
        try:
            await self._publish(store)
        except SharedDown:
            pass  # counted by the store; the next second tries again
        finally:
            self._publishing = False

    async def _publish(self, store: SharedStore) -> None:
        mono = time.monotonic()
        stored = self._stored
        if stored is not None and mono - stored[0] > NEW_ID_AFTER * self.ttl:
            # The last snapshot may have expired, and a console may have added it into its
            # departed sum: go on under a new id, with what was counted since that snapshot.
            self._previous = self.id
            self._generation += 1
            self.id = f"{store.instance}~{self._generation}"
            self._base = stored[1]
            self._stored = None
        snap = self.own()
        channels = snap["ch"]
        if self._base:
            snap["ch"] = _since(channels, self._base)
        body = orjson.dumps(snap)
        if len(body) > MAX_BYTES:
            if not self._too_big:
                log.warning(
                    "live numbers not shared: the snapshot is %d bytes (limit %d)", len(body), MAX_BYTES
                )
                self._too_big = True
            return
        previous = self._previous
        keys = (self.index, self.key(self.id), self.key(previous or self.id))
        await store.call_within(
            PUBLISH_TIMEOUT, "EVAL", PUBLISH, 3, *keys, self.id, body, self.ttl_ms, previous
        )
        self._stored = (mono, channels)
        self._previous = ""

    async def resync(self) -> None:  # Redis is back: show up in the list at once
        await self.publish()

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception:  # a bug here must not stop the next second's snapshot
                log.exception("publishing the live numbers failed")
            await asyncio.sleep(self.interval)

    async def others(self, mono: float) -> tuple[list[dict[str, Any]], int]:
        """The other live instances' snapshots, and how many live ones were not read
        (beyond :data:`MAX_INSTANCES` or :data:`MAX_READ_BYTES`); :class:`SharedDown` when
        Redis does not answer within :data:`READ_TIMEOUT`, for all of the round trips."""
        store = self.store
        deadline = time.monotonic() + READ_TIMEOUT

        async def within(*args: Any) -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SharedDown("timeout")
            return await store.call_within(left, *args)

        count, members = await within("EVAL", LIST, 1, self.index, self.ttl_ms, MAX_LISTED)
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        ids = [i for i in ids if not self.mine(i)]
        unlisted = max(0, int(count) - len(members))  # beyond MAX_LISTED: not even their ids
        merger = self.merger
        out: list[dict[str, Any]] = []
        budget = MAX_READ_BYTES
        read = 0
        while read < len(ids) and read < MAX_INSTANCES and budget > 0:
            # Never more than the bytes left (+ one snapshot): MAX_BYTES bounds each.
            size = max(1, min(READ_CHUNK, MAX_INSTANCES - read, budget // MAX_BYTES))
            chunk = ids[read : read + size]
            raws = await within("MGET", *(self.key(i) for i in chunk))
            read += len(chunk)
            for instance, raw in zip(chunk, raws, strict=True):
                if raw is None:  # expired (its process died) or deleted (it stopped)
                    continue
                budget -= len(raw)
                snap = self._parse(instance, raw)
                if snap is None:
                    merger.touch(instance, mono)  # there, though unreadable: keep its last
                    continue
                merger.see(instance, snap["ch"], mono)
                out.append(snap)
        omitted = ids[read:]
        for instance in omitted:  # there, though not read: their last numbers stay theirs
            merger.touch(instance, mono)
        return out, len(omitted) + unlisted

    def _parse(self, instance: str, raw: bytes) -> dict[str, Any] | None:
        try:
            snap = orjson.loads(raw)
            if snap.get("v") != VERSION or not isinstance(snap.get("ch"), dict):
                raise ValueError(f"layout {snap.get('v')!r}, this instance reads {VERSION}")
        except Exception as exc:
            if instance not in self._bad and len(self._bad) < MAX_INSTANCES:
                self._bad.add(instance)
                log.warning("live numbers of instance %s skipped: %s", instance, exc)
            return None
        snap["id"] = instance
        return snap  # type: ignore[no-any-return]

    async def merged(self, mono: float, wall: float) -> tuple[Snapshot | None, dict[str, Any]]:
        # A console that goes away mid-read does not cut it short: the merger is left whole
        # (the read ends within READ_TIMEOUT).
        task = asyncio.get_running_loop().create_task(self._merged(mono, wall))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)
        return await asyncio.shield(task)

    async def _merged(self, mono: float, wall: float) -> tuple[Snapshot | None, dict[str, Any]]:
        store = self.store
        async with self._reading:
            try:
                if not store.up:
                    raise SharedDown("Redis is down")
                others, omitted = await self.others(mono)
            except SharedDown:
                STATS["fallbacks"] += 1
                return None, {"redis": "down", "notice": NOTICE, "instances": None}
            own = self.own()
            live = [own, *others]
            merger = self.merger
            merger.see(store.instance, own["ch"], mono)  # every number, under one stable key

            def merge() -> tuple[Snapshot, dict[str, Any]]:
                totals = merger.totals(mono)
                return merged_snapshot(totals, live, mono, wall), fleet_totals(totals)

            # Tens of ms with many instances of many channels: beside the loop, not in it
            # (the lock keeps the merger to one reader).
            snap, fleet = await asyncio.to_thread(merge)
        instances = [
            {
                "id": instance["id"],
                "host": instance.get("host"),
                "pid": instance.get("pid"),
                "ageS": round(max(0.0, wall - float(instance.get("t") or wall)), 1),
                "activeStreams": instance.get("streams", 0),
                "redisUp": bool(instance.get("redis")),
                "self": instance is own,
            }
            for instance in live
        ]
        notice = None
        if omitted:
            notice = f"{omitted} more instances not read (the Overview reads {len(others) + 1})"
            if mono >= self._omitted_logged + OMITTED_LOG_EVERY:
                self._omitted_logged = mono
                log.warning(
                    "live numbers: %d instances not read (over %d instances or %d bytes); their "
                    "last numbers still count (logged at most once a minute)",
                    omitted,
                    MAX_INSTANCES,
                    MAX_READ_BYTES,
                )
        extra = {
            "redis": "up",
            "notice": notice,
            "instances": instances,
            "instancesOmitted": omitted,
            "fleet": fleet,
        }
        return snap, extra

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: publishes while the app runs, deletes its snapshot as it stops."""
        self._task = asyncio.get_running_loop().create_task(self.run())  # publishes at once
        yield
        await cancel_and_wait(self._task)
        store = self.store
        if store.up:  # gone from every console now, not in TTL (sent before the store stops)
            for instance in filter(None, (self.id, self._previous)):
                store.send("DEL", self.key(instance))
                store.send("ZREM", self.index, instance)


LIVE: web.AppKey[LiveFeed] = web.AppKey("ccx_live", LiveFeed)


def setup(app: web.Application, gateway: Gateway) -> None:
    """Publish this process's numbers, merge everyone's into the Overview, and add the
    ``ccx_redis_*`` families to ``/metrics`` (only with ``REDIS_URL``)."""
    store = gateway.shared
    if store is None:
        return
    exporter = app[EXPORTER]
    feed = LiveFeed(store, exporter)
    app[LIVE] = feed
    exporter.extra.append(lambda: redis_families(store))
    exporter.fleet = feed
    store.on_up.append(feed.resync)
    app.cleanup_ctx.append(feed.running)
