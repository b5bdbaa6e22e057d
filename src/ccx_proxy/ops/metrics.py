"""Prometheus metrics at ``GET /metrics``, and the numbers behind the console's Overview page.

Where the numbers come from::

    request ends ─► Team.finish ─► Record ─► Meter.observe     (on the loop: a dict hit, adds)
    attempt verdict ─► upstream.attempt.COUNTS                  (a list index)
    scrape ─► Meter + live state (streams, breakers, keys, reloads, dropped records)
          ├─ one process:  families built from them, rendered to text off the loop
          └─ --workers N:  this worker publishes its totals to PROMETHEUS_MULTIPROC_DIR
                           (every second and before a scrape); prometheus-client's
                           MultiProcessCollector adds up every worker's files

The request path never calls prometheus-client: :meth:`Meter.observe` adds to plain ints
in a row cached per (channel, model, status, outcome), and the exposition is built at
scrape time.  Every label is bounded: at most :data:`MAX_LABEL_VALUES` values each
(channel, model, member), later ones are counted under ``other``.

Access: ``Authorization: Bearer <token>`` or ``x-api-key: <token>`` with ``METRICS_TOKEN``
or the ``ADMIN_ACCESS_KEY``; ``METRICS_PUBLIC=true`` opens it; otherwise 401.
``METRICS_PER_MEMBER=true`` adds the per-member counters.

``GET /api/overview`` (admin key) serves the console's Overview: rates, error rate and TTFB
percentiles over the last minute, computed from the same metric families as ``/metrics``
(snapshots kept per poll, so it works across workers too).  With ``REDIS_URL``,
:mod:`ccx_proxy.shared.live` sets :attr:`Exporter.fleet`: the Overview then merges every
instance's numbers (each process's own, published to Redis), and falls back to this host's
when Redis is down; it also adds the ``ccx_redis_*`` families through :attr:`Exporter.extra`.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import values
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from ..auth import AccessKeys
from ..errors import JSON_CONTENT_TYPE, AuthenticationFailed
from ..headers import client_key, mask_secret
from ..settings import flag
from ..tasks import cancel_and_wait
from ..team.recorder import Record
from ..upstream import attempt

if TYPE_CHECKING:
    from ..reload import ConfigWatcher
    from ..state import Gateway

log = logging.getLogger("ccx_proxy.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LABEL_VALUES = 200  # per label; more distinct values are counted as OTHER
OTHER = "other"
CACHE_LIMIT = 4096  # raw label tuples remembered before the cache starts over
PUBLISH_INTERVAL = 1.0  # seconds between a worker's writes to the multiprocess files
TOKEN_TYPES = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
# Seconds.  TTFB: proxies answer in tens of ms, models in 0.5-10 s; duration: streams last minutes.
TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# Outcomes that are failures although the status was 200 (the stream broke after its headers).
BROKEN_OUTCOMES = frozenset({"upstream_cut", "stalled"})
# How the workers' gauges combine: streams add up; a channel or key counts as available only
# where every live worker can use it (any other gauge: the same, livemin).
GAUGE_MODES = {"ccx_active_streams": "livesum"}

HELP = {
    "ccx_requests": "Requests answered, by channel, upstream model and HTTP status.",
    "ccx_request_outcomes": "Requests by how they ended: complete, error, client_left, upstream_cut, "
    "stalled, shutdown.",
    "ccx_request_ttfb_seconds": "Time from the request to the upstream's response headers.",
    "ccx_request_duration_seconds": "Time from the request to its last byte.",
    "ccx_upstream_attempts": "Upstream attempts by verdict: success, failed, overloaded, rate_limited, "
    "rejected.",
    "ccx_tokens": "Tokens the upstream reported, by type.",
    "ccx_cost_usd": "Cost in USD, from the configured prices.",
    "ccx_active_streams": "Requests being relayed now.",
    "ccx_channel_available": "1 when the channel takes requests now (active, no back-off or open breaker, "
    "a usable key).",
    "ccx_key_available": "1 when the key is in rotation (not disabled, breaker not open, no 429 cool-down).",
    "ccx_config_reloads": "Channels-file reloads (file change or SIGHUP), by result.",
    "ccx_usage_records_dropped": "Usage records lost (queue full or the database failing).",
    "ccx_member_requests": "Requests per member.",
    "ccx_member_tokens": "Tokens per member, by type.",
}


# ------------------------------------------------------------------ the request side


class LabelCap:
    """The first ``limit`` distinct values of a label pass; later ones become ``other``."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        seen = self.seen
        if value in seen:
            return value
        if len(seen) >= self.limit:
            return OTHER
        seen.add(value)
        return value


def le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The ``le`` label of each bucket, +Inf included, as prometheus-client writes them."""
    return tuple(floatToGoString(b) for b in (*bounds, float("inf")))  # type: ignore[no-untyped-call]


class Histogram:
    """Counts per bucket (not cumulative: one add per observation) and their sum."""

    __slots__ = ("bounds", "labels", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.labels = le_labels(bounds)
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: bounds[i] >= value
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for le, count in zip(self.labels, self.counts, strict=True):
            acc += count
            out.append((le, float(acc)))
        return out


class Spend:
    """Tokens (as TOKEN_TYPES) and cost of one (channel, model)."""

    __slots__ = ("tokens", "cost")

    def __init__(self) -> None:
        self.tokens = [0] * len(TOKEN_TYPES)
        self.cost = 0.0


class Row:
    """One (channel, model, status, outcome): its count, and where its other numbers go."""

    __slots__ = ("count", "spend", "ttfb", "duration")

    def __init__(self, spend: Spend, ttfb: Histogram, duration: Histogram) -> None:
        self.count = 0
        self.spend = spend
        self.ttfb = ttfb
        self.duration = duration


class MemberRow:
    __slots__ = ("count", "tokens")

    def __init__(self) -> None:
        self.count = 0
        self.tokens = [0] * len(TOKEN_TYPES)


RowKey = tuple[str, str, str, str]  # channel, model, code, outcome (capped)


class Meter:
    """The request-side numbers: plain ints and floats, added to by :meth:`observe`."""

    def __init__(self, per_member: bool = False) -> None:
        self.per_member = per_member
        self.rows: dict[RowKey, Row] = {}
        self.spends: dict[tuple[str, str], Spend] = {}
        self.latency: dict[str, tuple[Histogram, Histogram]] = {}
        self.members: dict[str, MemberRow] = {}
        self.channel_cap, self.model_cap, self.member_cap = LabelCap(), LabelCap(), LabelCap()
        self.code_cap = LabelCap()
        self._cache: dict[tuple[str | None, str | None, int, str], Row] = {}
        self._member_cache: dict[str, MemberRow] = {}
        self._failing = False

    def observe(self, record: Record) -> None:
        """One finished request (a ``Team.observers`` callable: on the loop, never raises)."""
        try:
            key = (record.channel, record.upstream_model or record.model, record.status, record.outcome)
            row = self._cache.get(key)
            if row is None:
                row = self._row(key)
            row.count += 1
            ttfb = record.ttfb_ms
            if ttfb is not None:
                row.ttfb.observe(ttfb / 1000)
            row.duration.observe(record.duration_ms / 1000)
            i, o, w5, w1, r = (
                record.input_tokens,
                record.output_tokens,
                record.cache_write_5m,
                record.cache_write_1h,
                record.cache_read,
            )
            spent = i or o or w5 or w1 or r
            if spent:
                tokens = row.spend.tokens
                tokens[0] += i
                tokens[1] += o
                tokens[2] += w5
                tokens[3] += w1
                tokens[4] += r
            cost = record.cost_usd
            if cost:
                row.spend.cost += cost
            if self.per_member:
                member = record.member
                seat = self._member_cache.get(member) or self._member(member)
                seat.count += 1
                if spent:
                    tokens = seat.tokens
                    tokens[0] += i
                    tokens[1] += o
                    tokens[2] += w5
                    tokens[3] += w1
                    tokens[4] += r
        except Exception:  # a metrics bug must never fail a request
            if not self._failing:
                log.exception("metrics: a request could not be counted")
                self._failing = True

    def _row(self, raw: tuple[str | None, str | None, int, str]) -> Row:
        channel = self.channel_cap(raw[0] or "")
        model = self.model_cap(raw[1] or "")
        key = (channel, model, self.code_cap(str(raw[2])), raw[3])
        row = self.rows.get(key)
        if row is None:
            spend = self.spends.get((channel, model))
            if spend is None:
                spend = self.spends[channel, model] = Spend()
            latency = self.latency.get(channel)
            if latency is None:
                latency = self.latency[channel] = (Histogram(TTFB_BUCKETS), Histogram(DURATION_BUCKETS))
            row = self.rows[key] = Row(spend, *latency)
        cache = self._cache
        if len(cache) >= CACHE_LIMIT:  # raw names can be many (passthrough models): start over
            cache.clear()
        cache[raw] = row
        return row

    def _member(self, name: str) -> MemberRow:
        capped = self.member_cap(name)
        row = self.members.get(capped)
        if row is None:
            row = self.members[capped] = MemberRow()
        if len(self._member_cache) >= CACHE_LIMIT:
            self._member_cache.clear()
        self._member_cache[name] = row
        return row


# ------------------------------------------------------------------ live state, read at scrape


class Live:
    """What is true now: streams, availability, attempts, reloads, dropped records."""

    def __init__(self, gateway: Gateway, watcher: Callable[[], ConfigWatcher | None]) -> None:
        self.gateway = gateway
        self.watcher = watcher
        self.channel_cap = LabelCap()

    def availability(self) -> tuple[list[tuple[str, float]], list[tuple[str, str, float]]]:
        """(channel, 0|1) and (channel, masked key, 0|1) for every configured channel."""
        gateway = self.gateway
        health = gateway.health
        now = health.clock()
        channels: dict[str, float] = {}
        keys: dict[tuple[str, str], float] = {}
        for channel in gateway.runtime.config.channels:
            name = self.channel_cap(channel.name)
            state = health.get(channel.name)
            usable_keys = 0
            seen: dict[str, int] = {}
            for raw in channel.api_keys:
                masked = mask_secret(raw)
                seen[masked] = seen.get(masked, 0) + 1
                if seen[masked] > 1:  # two keys with one mask: still two series
                    masked = f"{masked}#{seen[masked]}"
                kh = state.keys.get(raw) if state is not None else None
                ok = kh is None or (
                    not kh.disabled
                    and kh.breaker.available(now)
                    and not any(until > now for until in kh.cooldowns.values())
                )
                usable_keys += ok
                # min: past MAX_LABEL_VALUES channels, "other" is available only if all are
                keys[name, masked] = min(keys.get((name, masked), 1.0), 1.0 if ok else 0.0)
            ok = channel.active and usable_keys > 0 and (state is None or state.available(now))
            channels[name] = min(channels.get(name, 1.0), 1.0 if ok else 0.0)
        return list(channels.items()), [(c, k, v) for (c, k), v in keys.items()]

    def attempts(self) -> list[tuple[str, str, float]]:
        out: dict[tuple[str, str], float] = {}
        for channel, counts in list(attempt.COUNTS.items()):
            name = self.channel_cap(channel)
            for outcome, count in zip(attempt.OUTCOMES, counts, strict=True):
                out[name, outcome] = out.get((name, outcome), 0.0) + count
        return [(c, o, v) for (c, o), v in out.items()]

    def reloads(self) -> tuple[int, int]:
        watcher = self.watcher()
        return (watcher.reloads, watcher.rejected) if watcher is not None else (0, 0)


def build_families(meter: Meter, live: Live) -> list[Metric]:
    """Every ccx_* family, from this process's numbers (single-process exposition)."""
    requests = CounterMetricFamily("ccx_requests", HELP["ccx_requests"], labels=("channel", "model", "code"))
    outcomes = CounterMetricFamily(
        "ccx_request_outcomes", HELP["ccx_request_outcomes"], labels=("channel", "outcome")
    )
    by_code: dict[tuple[str, str, str], int] = {}
    by_outcome: dict[tuple[str, str], int] = {}
    for (channel, model, code, outcome), row in meter.rows.items():
        by_code[channel, model, code] = by_code.get((channel, model, code), 0) + row.count
        by_outcome[channel, outcome] = by_outcome.get((channel, outcome), 0) + row.count
    for labels, count in by_code.items():
        requests.add_metric(labels, count)
    for labels2, count in by_outcome.items():
        outcomes.add_metric(labels2, count)
    ttfb = HistogramMetricFamily(
        "ccx_request_ttfb_seconds", HELP["ccx_request_ttfb_seconds"], labels=("channel",)
    )
    duration = HistogramMetricFamily(
        "ccx_request_duration_seconds", HELP["ccx_request_duration_seconds"], labels=("channel",)
    )
    for channel, (t, d) in meter.latency.items():
        if any(t.counts):  # requests refused before any upstream answered have no TTFB
            ttfb.add_metric((channel,), t.cumulative(), t.total)
        duration.add_metric((channel,), d.cumulative(), d.total)
    tokens = CounterMetricFamily("ccx_tokens", HELP["ccx_tokens"], labels=("channel", "model", "type"))
    cost = CounterMetricFamily("ccx_cost_usd", HELP["ccx_cost_usd"], labels=("channel", "model"))
    for (channel, model), spend in meter.spends.items():
        if any(spend.tokens):
            for kind, n in zip(TOKEN_TYPES, spend.tokens, strict=True):
                tokens.add_metric((channel, model, kind), n)
        if spend.cost:
            cost.add_metric((channel, model), spend.cost)
    families: list[Metric] = [requests, outcomes, ttfb, duration, tokens, cost]
    families.extend(live_families(live))
    if meter.per_member:
        member_requests = CounterMetricFamily(
            "ccx_member_requests", HELP["ccx_member_requests"], labels=("member",)
        )
        member_tokens = CounterMetricFamily(
            "ccx_member_tokens", HELP["ccx_member_tokens"], labels=("member", "type")
        )
        for name, member in meter.members.items():
            member_requests.add_metric((name,), member.count)
            if any(member.tokens):
                for kind, n in zip(TOKEN_TYPES, member.tokens, strict=True):
                    member_tokens.add_metric((name, kind), n)
        families += [member_requests, member_tokens]
    return families


def live_families(live: Live) -> Iterable[Metric]:
    attempts = CounterMetricFamily(
        "ccx_upstream_attempts", HELP["ccx_upstream_attempts"], labels=("channel", "outcome")
    )
    for channel, outcome, count in live.attempts():
        attempts.add_metric((channel, outcome), count)
    yield attempts
    yield GaugeMetricFamily("ccx_active_streams", HELP["ccx_active_streams"], value=live.gateway.streams)
    channels, keys = live.availability()
    available = GaugeMetricFamily("ccx_channel_available", HELP["ccx_channel_available"], labels=("channel",))
    for name, ok in channels:
        available.add_metric((name,), ok)
    yield available
    key_available = GaugeMetricFamily(
        "ccx_key_available", HELP["ccx_key_available"], labels=("channel", "key")
    )
    for name, key, ok in keys:
        key_available.add_metric((name, key), ok)
    yield key_available
    reloads = CounterMetricFamily("ccx_config_reloads", HELP["ccx_config_reloads"], labels=("result",))
    applied, rejected = live.reloads()
    reloads.add_metric(("success",), applied)
    reloads.add_metric(("rejected",), rejected)
    yield reloads
    yield CounterMetricFamily(
        "ccx_usage_records_dropped",
        HELP["ccx_usage_records_dropped"],
        value=live.gateway.team.recorder.dropped,
    )


class _Families:
    """A collector over a list built beforehand (rendered off the loop)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


# ------------------------------------------------------------------ --workers N


def prepare_workers(env: MutableMapping[str, str]) -> Callable[[], None]:
    """For the supervisor of ``serve --workers N``, before it starts the workers: the
    directory the workers share their metrics through, emptied (counters from an earlier run
    must not add up), named in ``env[PROMETHEUS_MULTIPROC_DIR]`` for the workers to inherit.
    A directory the operator named is used and emptied; otherwise a new temporary one, which
    the returned cleanup removes when the workers have exited."""
    given = env.get(MULTIPROC_ENV, "").strip()
    if given:
        os.makedirs(given, exist_ok=True)
        for path in glob.glob(os.path.join(given, "*.db")):
            os.remove(path)
        return lambda: None
    path = tempfile.mkdtemp(prefix="ccx-metrics-")
    env[MULTIPROC_ENV] = path
    return lambda: shutil.rmtree(path, ignore_errors=True)


class Publisher:
    """This worker's families, written to its own files in the multiprocess directory, in
    prometheus-client's format (MultiProcessCollector sums counters and histograms over the
    workers, and gauges as :data:`GAUGE_MODES` says).  A series is written only when its
    value changed; a gauge series that went away (a channel or key removed) reads NaN, as a
    file entry cannot be deleted."""

    def __init__(self, value_class: Any) -> None:
        self.value_class = value_class
        self.cells: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Any, list[float]]] = {}
        self.gauges: set[tuple[str, tuple[tuple[str, str], ...]]] = set()

    def _set(self, family: Metric, name: str, labels: dict[str, str], value: float, mode: str) -> None:
        key = (name, tuple(labels.items()))
        entry = self.cells.get(key)
        if entry is None:
            extra = {"multiprocess_mode": mode} if mode else {}
            cell = self.value_class(
                family.type,
                family.name,
                name,
                tuple(labels),
                tuple(labels.values()),
                family.documentation,
                **extra,
            )
            entry = self.cells[key] = (cell, [float("nan")])
        last = entry[1]
        if last[0] != value:  # NaN never equals: a new cell is always written
            entry[0].set(value)
            last[0] = value

    def publish(self, families: Iterable[Metric]) -> None:
        gauges: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for family in families:
            typ = family.type
            mode = GAUGE_MODES.get(family.name, "livemin") if typ == "gauge" else ""
            below: dict[tuple[tuple[str, str], ...], float] = {}  # histogram: the bucket before
            for sample in family.samples:
                value = sample.value
                if typ == "histogram":
                    if sample.name.endswith("_count"):  # the collector adds up the buckets
                        continue
                    if sample.name.endswith("_bucket"):  # the files hold per-bucket counts
                        series = tuple((k, v) for k, v in sample.labels.items() if k != "le")
                        value -= below.get(series, 0.0)
                        below[series] = sample.value
                self._set(family, sample.name, sample.labels, value, mode)
                if typ == "gauge":
                    gauges.add((sample.name, tuple(sample.labels.items())))
        for gone in self.gauges - gauges:
            cell, last = self.cells[gone]
            if last[0] == last[0]:  # not NaN yet
                cell.set(float("nan"))
                last[0] = float("nan")
        self.gauges = gauges


# ------------------------------------------------------------------ the overview


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bucket: its bound is all that is known
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


class Snapshot:
    """What the Overview needs from one collection of the metric families."""

    __slots__ = ("mono", "wall", "requests", "errors", "ttfb", "output", "streams", "available")

    def __init__(self, mono: float, wall: float) -> None:
        self.mono, self.wall = mono, wall
        self.requests: dict[str, float] = {}  # channel -> requests ("" : refused by the gateway)
        self.errors: dict[str, float] = {}
        self.ttfb: dict[str, dict[float, float]] = {}  # channel -> le -> cumulative count
        self.output: dict[str, float] = {}  # channel -> output tokens
        self.streams = 0.0
        self.available: dict[str, float] = {}

    @classmethod
    def of(cls, families: Iterable[Metric], mono: float, wall: float) -> Snapshot:
        snap = cls(mono, wall)
        for family in families:
            name = family.name
            for sample in family.samples:
                labels = sample.labels
                channel = labels.get("channel", "")
                if sample.name == "ccx_requests_total":
                    snap.requests[channel] = snap.requests.get(channel, 0.0) + sample.value
                    code = int(labels["code"]) if labels.get("code", "").isdigit() else 0
                    if code >= 500 or code == 429:
                        snap.errors[channel] = snap.errors.get(channel, 0.0) + sample.value
                elif sample.name == "ccx_request_outcomes_total":
                    if labels.get("outcome") in BROKEN_OUTCOMES:  # a 200 whose stream broke
                        snap.errors[channel] = snap.errors.get(channel, 0.0) + sample.value
                elif sample.name == "ccx_request_ttfb_seconds_bucket":
                    le = float(labels["le"])
                    snap.ttfb.setdefault(channel, {})[le] = sample.value
                elif sample.name == "ccx_tokens_total" and labels.get("type") == "output":
                    snap.output[channel] = snap.output.get(channel, 0.0) + sample.value
                elif name == "ccx_active_streams":
                    snap.streams = sample.value
                elif name == "ccx_channel_available":
                    snap.available[channel] = sample.value
        return snap


def _delta_buckets(
    new: dict[float, float] | None, old: dict[float, float] | None
) -> list[tuple[float, float]]:
    if not new:
        return []
    old = old or {}
    return sorted((le, count - old.get(le, 0.0)) for le, count in new.items())


def _merge_buckets(many: Iterable[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    total: dict[float, float] = {}
    for buckets in many:
        for le, count in buckets:
            total[le] = total.get(le, 0.0) + count
    return sorted(total.items())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Fleet(Protocol):
    """Every instance's numbers, merged (:mod:`ccx_proxy.shared.live`, with ``REDIS_URL``)."""

    async def merged(self, mono: float, wall: float) -> tuple[Snapshot | None, dict[str, Any]]:
        """The merged snapshot (None: Redis is down, show this host's) and the fields the
        Overview gains (``instances``, ``redis``, ``notice``)."""
        ...


class Overview:
    """A ring of snapshots, one per poll, over the last :attr:`window` seconds."""

    def __init__(self, window: float = 60.0, keep: int = 300) -> None:
        self.window = window
        self.ring: deque[Snapshot] = deque(maxlen=keep)

    def add(self, snap: Snapshot) -> None:
        ring = self.ring
        while ring and ring[0].mono < snap.mono - self.window:
            ring.popleft()
        ring.append(snap)

    def view(self, gateway: Gateway) -> dict[str, Any]:
        now = self.ring[-1]
        base = self.ring[0] if len(self.ring) > 1 else None
        span = now.mono - base.mono if base is not None else 0.0
        config = gateway.runtime.config
        names = [c.name for c in config.channels]
        names += sorted(n for n in now.requests if n and n not in names)
        statuses = {c.name: c.status for c in config.channels}
        active = [c.name for c in config.channels if c.active]

        def rate(new: float, old: float) -> float | None:
            return round(max(0.0, new - old) / span, 3) if span > 0 else None

        def error_rate(channels: Iterable[str]) -> float | None:
            if base is None:
                return None
            requests = sum(now.requests.get(c, 0.0) - base.requests.get(c, 0.0) for c in channels)
            errors = sum(now.errors.get(c, 0.0) - base.errors.get(c, 0.0) for c in channels)
            return round(errors / requests, 4) if requests > 0 else None

        rows = []
        for name in names:
            ttfb = _delta_buckets(now.ttfb.get(name), base.ttfb.get(name) if base else None) if base else []
            rows.append(
                {
                    "name": name,
                    "status": statuses.get(name, "removed"),
                    "available": now.available[name] == 1.0 if name in now.available else None,
                    "requests": int(now.requests.get(name, 0.0)),
                    "rps": rate(now.requests.get(name, 0.0), base.requests.get(name, 0.0)) if base else None,
                    "errorRate": error_rate((name,)),
                    "ttfbP50Ms": _ms(quantile(0.5, ttfb)),
                    "ttfbP95Ms": _ms(quantile(0.95, ttfb)),
                    "outputTokensPerS": rate(now.output.get(name, 0.0), base.output.get(name, 0.0))
                    if base
                    else None,
                }
            )
        all_channels = set(now.requests) | (set(base.requests) if base else set())
        total_now = sum(now.requests.values())
        every = (
            _merge_buckets(_delta_buckets(now.ttfb.get(c), base.ttfb.get(c)) for c in now.ttfb)
            if base
            else []
        )
        series = []
        previous = None
        for snap in self.ring:
            if previous is not None and snap.mono > previous.mono:
                dt = snap.mono - previous.mono
                count = sum(snap.requests.values()) - sum(previous.requests.values())
                errors = sum(snap.errors.values()) - sum(previous.errors.values())
                series.append(
                    {
                        "t": round(snap.wall, 3),
                        "rps": round(count / dt, 3),
                        "errorRate": round(errors / count, 4) if count > 0 else 0.0,
                    }
                )
            previous = snap
        return {
            "time": now.wall,
            "window": round(span, 3) if base is not None else None,
            "totals": {
                "requests": int(total_now),
                "rps": rate(total_now, sum(base.requests.values())) if base else None,
                "errorRate": error_rate(all_channels),
                "ttfbP50Ms": _ms(quantile(0.5, every)),
                "ttfbP95Ms": _ms(quantile(0.95, every)),
                "activeStreams": int(now.streams),
                "channelsAvailable": sum(1 for n in active if now.available.get(n) == 1.0),
                "channels": len(active),  # the active ones: the others are off on purpose
            },
            "channels": rows,
            "series": series,
        }


# ------------------------------------------------------------------ the exporter and its routes


class Exporter:
    def __init__(
        self,
        gateway: Gateway,
        env: Mapping[str, str],
        watcher: Callable[[], ConfigWatcher | None] = lambda: None,
        value_class: Any = None,
    ) -> None:
        self.gateway = gateway
        self.public = flag(env, "METRICS_PUBLIC", False)
        tokens = [t for t in (env.get("METRICS_TOKEN", "").strip(),) if t]
        allowed = (*tokens, *gateway.settings.admin_keys)
        self.keys = AccessKeys(allowed, "METRICS_TOKEN") if allowed else None
        self.meter = Meter(per_member=flag(env, "METRICS_PER_MEMBER", False))
        self.live = Live(gateway, watcher)
        self.overview = Overview()
        # More families of this process (the ccx_redis_* ones, set by ccx_proxy.shared.live).
        self.extra: list[Callable[[], Iterable[Metric]]] = []
        self.fleet: Fleet | None = None  # REDIS_URL: the Overview shows every instance
        self._scope = ""  # what the Overview ring holds: "fleet" or "host" (never a mix)
        directory = env.get(MULTIPROC_ENV, "").strip()
        self.directory = directory or None
        self.publisher: Publisher | None = None
        self.collector: Any = None
        if directory:
            os.makedirs(directory, exist_ok=True)
            if value_class is None:  # prometheus-client's own (chosen at import from the env)
                value_class = values.ValueClass
                if not getattr(value_class, "_multiprocess", False):
                    value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
            self.publisher = Publisher(value_class)
            self.collector = MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
            self.process = None
        else:
            self.process = ProcessCollector(registry=None)

    def check(self, headers: Mapping[str, str]) -> None:
        if self.public:
            return
        if self.keys is None:
            raise AuthenticationFailed(
                "/metrics needs a token and none is set: set METRICS_TOKEN (or ADMIN_ACCESS_KEY) and send "
                "it as Authorization: Bearer, or set METRICS_PUBLIC=true"
            )
        key = client_key(headers)
        if key is None:
            raise AuthenticationFailed(
                "missing metrics token: send METRICS_TOKEN or the ADMIN_ACCESS_KEY as "
                "Authorization: Bearer (or x-api-key)"
            )
        if not self.keys.matches(key):
            raise AuthenticationFailed(
                "invalid metrics token: it matches neither METRICS_TOKEN nor the ADMIN_ACCESS_KEY"
            )

    def own_families(self) -> list[Metric]:
        """This process's families, never the other workers'."""
        families = build_families(self.meter, self.live)
        for more in self.extra:
            families.extend(more())
        return families

    def publish(self) -> None:
        if self.publisher is not None:
            self.publisher.publish(self.own_families())

    async def families(self) -> list[Metric]:
        """Every family /metrics shows (all workers' with a multiprocess directory)."""
        if self.publisher is None:
            families = self.own_families()
            if self.process is not None:
                families.extend(self.process.collect())
            return families
        self.publish()  # this worker's latest; the others' are at most PUBLISH_INTERVAL old
        return await asyncio.to_thread(lambda: list(self.collector.collect()))

    async def render(self) -> bytes:
        families = await self.families()
        return await asyncio.to_thread(generate_latest, _Families(families))

    async def overview_view(self) -> dict[str, Any]:
        mono, wall = time.monotonic(), time.time()
        snap, extra = await self.fleet.merged(mono, wall) if self.fleet is not None else (None, {})
        scope = "fleet" if snap is not None else "host"
        if snap is None:
            snap = Snapshot.of(await self.families(), mono, wall)
        if scope != self._scope:  # rates between a host's numbers and the fleet's mean nothing
            self.overview.ring.clear()
            self._scope = scope
        self.overview.add(snap)
        view = self.overview.view(self.gateway)
        if scope == "fleet":
            view["workers"] = "instances"
        else:
            view["workers"] = "all" if self.publisher is not None else "this process"
        view.update(extra)
        return view

    async def run(self) -> None:
        """With a multiprocess directory: publish this worker's totals every second."""
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            try:
                self.publish()
            except Exception:  # pragma: no cover - a disk full: log, keep serving
                log.exception("metrics: writing to %s failed", self.directory)


EXPORTER: web.AppKey[Exporter] = web.AppKey("ccx_metrics", Exporter)


async def metrics(request: web.Request) -> web.Response:
    exporter = request.app[EXPORTER]
    exporter.check(request.headers)
    body = await exporter.render()
    return web.Response(body=body, headers={"Content-Type": TEXT_CONTENT_TYPE, "Cache-Control": "no-store"})


async def overview(request: web.Request) -> web.Response:
    from ..admin.api import ADMIN  # here: the admin package imports the app's modules

    request.app[ADMIN].check(request)
    view = await request.app[EXPORTER].overview_view()
    return web.Response(body=orjson.dumps(view), content_type=JSON_CONTENT_TYPE)


def setup(app: web.Application, gateway: Gateway, env: Mapping[str, str] | None = None) -> Exporter:
    """``/metrics``, ``/api/overview``, and the observer that counts every request."""
    from ..app import WATCHER  # here: app.py imports this package

    exporter = Exporter(gateway, os.environ if env is None else env, lambda: app.get(WATCHER))
    app[EXPORTER] = exporter
    gateway.team.observers.append(exporter.meter.observe)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/overview", overview)
    if exporter.publisher is not None:

        async def publishing(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(exporter.run())
            yield
            await cancel_and_wait(task)
            exporter.publish()  # the last numbers of a worker that stops

        app.cleanup_ctx.append(publishing)
    return exporter
