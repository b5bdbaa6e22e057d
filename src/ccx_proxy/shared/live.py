"""Every instance's live numbers, merged for the console's Overview; the Redis connection's own.

Each process (a ``--workers N`` worker counts as one) publishes **its own** numbers, never
a host-wide multiprocess sum, so the merge counts every process exactly once::

    every PUBLISH_INTERVAL:  SET  <prefix>live:<instance> <snapshot> PX <TTL>
                             SADD <prefix>live:instances <instance>
    GET /api/overview:       SMEMBERS, then MGET of the others' snapshots (ids whose key
                             expired are removed from the set); this process's own numbers
                             are taken fresh from memory

A snapshot is one JSON object, per channel: requests, errors (5xx, 429, streams cut after
their start: the Overview's definition), cumulative TTFB and duration buckets, tokens by
type, cost, upstream attempts by verdict, availability; and the streams in flight.  It is
bounded by the metrics' label caps (at most 201 channels, a fixed set of numbers each) and
by :data:`MAX_BYTES`.  An instance that dies stops refreshing its key: it is gone from the
list within :data:`TTL`; one that stops cleanly deletes it at once.

**The merged view** (``/api/overview`` on any instance while Redis answers):

* counters and histogram buckets are summed over the instances; an instance that went away
  keeps contributing the numbers it last published (counters must not run backwards, or
  the rates over the last minute would), so ``totals.requests`` counts every request of
  the instances this process has seen since it started watching;
* streams in flight: the sum over the live instances;
* availability: a channel is available only where **every** live instance can use it (the
  worst view, as the ``--workers`` gauges do): one instance backing off shows;
* ``instances``: each live one (id, host, pid, age of its snapshot, streams, whether its
  Redis was up), this process first.

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
import contextlib
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
from .client import STATS, SharedDown, SharedStore

if TYPE_CHECKING:
    from ..state import Gateway

log = logging.getLogger("ccx_proxy.shared.live")

VERSION = 1  # the snapshot's layout; others are skipped
PUBLISH_INTERVAL = 1.0  # seconds between two snapshots of one process
TTL = 5.0  # seconds a snapshot lives: an instance that dies leaves the list within this
MAX_BYTES = 256 * 1024  # a bigger snapshot is not published (the label caps keep it far below)
MAX_INSTANCES = 256  # snapshots one overview reads
FORGET_AFTER = 3600.0  # seconds: a departed instance's numbers are folded into one sum
MAX_REMEMBERED = 1024  # instances remembered one by one (beyond: folded, oldest first)
NOTICE = "Redis down: this host only"
INF = float("inf")
TTFB_LE = (*TTFB_BUCKETS, INF)
DURATION_LE = (*DURATION_BUCKETS, INF)
COUNTERS = ("n", "e", "usd")  # per channel, summed
VECTORS = {"ttfb": len(TTFB_LE), "dur": len(DURATION_LE), "tok": len(TOKEN_TYPES)}

HELP = {
    "ccx_redis_up": "1 while this process's Redis connection answers (REDIS_URL); with workers, 1 only "
    "when every worker's does.",
    "ccx_redis_errors": "Redis round trips that failed or timed out.",
    "ccx_redis_fallbacks": "Decisions taken on local state because Redis was down.",
    "ccx_redis_state_changes": "The Redis connection going down or coming back up.",
    "ccx_redis_dropped": "Fire-and-forget Redis commands not sent (Redis down, or the queue full).",
}

Channels = dict[str, dict[str, Any]]


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
        into = total.setdefault(str(name), {})
        for field in COUNTERS:
            value = row.get(field)
            if isinstance(value, int | float):
                into[field] = into.get(field, 0) + value
        for field, size in VECTORS.items():
            vector = row.get(field)
            if isinstance(vector, list) and len(vector) == size:
                acc = into.setdefault(field, [0] * size)
                for i, value in enumerate(vector):
                    if isinstance(value, int | float):
                        acc[i] += value
        attempts = row.get("att")
        if isinstance(attempts, dict):
            acc_att = into.setdefault("att", {})
            for outcome, value in attempts.items():
                if isinstance(value, int | float):
                    acc_att[outcome] = acc_att.get(outcome, 0) + value


class Merger:
    """Every instance this process has seen, for counters that never run backwards: the
    live ones' latest numbers, the departed ones' last, and (after :data:`FORGET_AFTER`, or
    beyond :data:`MAX_REMEMBERED`) a sum of the forgotten ones."""

    def __init__(self) -> None:
        self.known: dict[str, tuple[Channels, float]] = {}  # id -> (channels, last seen, monotonic)
        self.forgotten: Channels = {}

    def see(self, instance: str, channels: Channels, mono: float) -> None:
        self.known.pop(instance, None)  # re-inserted: the dict stays ordered by last sight
        self.known[instance] = (channels, mono)

    def totals(self, mono: float) -> Channels:
        known = self.known
        while known:
            oldest = next(iter(known))
            channels, seen = known[oldest]
            if seen >= mono - FORGET_AFTER and len(known) <= MAX_REMEMBERED:
                break
            _add(self.forgotten, channels)
            del known[oldest]
        total: Channels = {}
        _add(total, self.forgotten)
        for channels, _ in known.values():
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
        self.ttl_ms = int(TTL * 1000)
        self.index = store.key("live", "instances")
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.merger = Merger()
        self._too_big = False
        self._bad: set[str] = set()  # instances whose snapshot could not be read (logged once)
        self._task: asyncio.Task[None] | None = None

    def key(self, instance: str) -> str:
        return self.store.key("live", instance)

    def own(self) -> dict[str, Any]:
        channels, streams = own_channels(build_families(self.exporter.meter, self.exporter.live))
        return {
            "v": VERSION,
            "id": self.store.instance,
            "host": self.host,
            "pid": self.pid,
            "t": round(time.time(), 3),
            "redis": self.store.up,
            "streams": streams,
            "ch": channels,
        }

    def publish(self) -> None:
        """This process's snapshot, fire and forget (nothing while Redis is down)."""
        store = self.store
        if not store.up:
            return
        body = orjson.dumps(self.own())
        if len(body) > MAX_BYTES:
            if not self._too_big:
                log.warning(
                    "live numbers not shared: the snapshot is %d bytes (limit %d)", len(body), MAX_BYTES
                )
                self._too_big = True
            return
        store.send("SET", self.key(store.instance), body, "PX", self.ttl_ms)
        store.send("SADD", self.index, store.instance)

    async def resync(self) -> None:  # Redis is back: show up in the list at once
        self.publish()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.publish()
            except Exception:  # a bug here must not stop the next second's snapshot
                log.exception("publishing the live numbers failed")

    async def others(self) -> list[dict[str, Any]]:
        """The other live instances' snapshots (:class:`SharedDown` when Redis does not answer)."""
        store = self.store
        members = await store.call("SMEMBERS", self.index)
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        ids = [i for i in ids if i != store.instance][:MAX_INSTANCES]
        if not ids:
            return []
        raws = await store.call("MGET", *(self.key(i) for i in ids))
        out, gone = [], []
        for instance, raw in zip(ids, raws, strict=True):
            if raw is None:  # expired: its process died (or stopped without a word)
                gone.append(instance)
                continue
            try:
                snap = orjson.loads(raw)
                if snap.get("v") != VERSION or not isinstance(snap.get("ch"), dict):
                    raise ValueError(f"layout {snap.get('v')!r}, this instance reads {VERSION}")
            except Exception as exc:
                if instance not in self._bad and len(self._bad) < MAX_INSTANCES:
                    self._bad.add(instance)
                    log.warning("live numbers of instance %s skipped: %s", instance, exc)
                continue
            snap["id"] = instance
            out.append(snap)
        if gone:
            store.send("SREM", self.index, *gone)
        return out

    async def merged(self, mono: float, wall: float) -> tuple[Snapshot | None, dict[str, Any]]:
        store = self.store
        try:
            if not store.up:
                raise SharedDown("Redis is down")
            others = await self.others()
        except SharedDown:
            STATS["fallbacks"] += 1
            return None, {"redis": "down", "notice": NOTICE, "instances": None}
        own = self.own()
        live = [own, *others]
        merger = self.merger
        for instance in live:
            merger.see(instance["id"], instance["ch"], mono)
        totals = merger.totals(mono)
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
        extra = {"redis": "up", "notice": None, "instances": instances, "fleet": fleet_totals(totals)}
        return merged_snapshot(totals, live, mono, wall), extra

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: publishes while the app runs, deletes its snapshot as it stops."""
        self._task = asyncio.get_running_loop().create_task(self.run())
        self.publish()
        yield
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        store = self.store
        if store.up:  # gone from every console now, not in TTL (sent before the store stops)
            store.send("DEL", self.key(store.instance))
            store.send("SREM", self.index, store.instance)


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
