"""Prometheus metrics at /metrics and the Overview numbers: exact counters after a scripted
mix of requests, access, bounded labels, the multiprocess files of ``--workers N``."""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from ccx_proxy.app import WATCHER, create_app
from ccx_proxy.config import load_config
from ccx_proxy.mock_upstream import MockUpstream
from ccx_proxy.ops import metrics
from ccx_proxy.ops.accesslog import JsonFormatter
from ccx_proxy.ops.metrics import (
    CACHE_LIMIT,
    EXPORTER,
    MAX_LABEL_VALUES,
    MULTIPROC_ENV,
    OTHER,
    Exporter,
    LabelCap,
    Meter,
    prepare_workers,
    quantile,
)
from ccx_proxy.server import install, server_kwargs
from ccx_proxy.state import GATEWAY
from ccx_proxy.team.recorder import Record
from ccx_proxy.upstream import attempt
from tests.conftest import (
    ACCESS_KEY,
    AUTH,
    SSE_BODY,
    UPSTREAM_KEY,
    FakeUpstream,
    GatewayFactory,
    Recorded,
    Reply,
    assert_anthropic_error,
    channel,
    make_settings,
    message_body,
    unused_port,
)

ADMIN_KEY = "admin-key-0123456789"
METRICS_TOKEN = "metrics-token-abcdef012345"
JSON = {"Content-Type": "application/json"}
MAPPING = {m: f"up-{m}" for m in ("alpha", "limited", "failing", "cut", "busy", "doomed", "refused")}
PRICES = {"up-*": {"input": 3, "output": 15}}  # USD per million tokens


Series = dict[tuple[tuple[str, str], ...], float]


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """No metrics settings from the environment, and fresh attempt counts (they are per process)."""
    for name in ("METRICS_TOKEN", "METRICS_PUBLIC", "METRICS_PER_MEMBER", MULTIPROC_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(attempt, "COUNTS", {})


def _answer(model: str, tokens_in: int, tokens_out: int) -> Reply:
    body = orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }
    )
    return Reply(headers=JSON, chunks=[body])


def _error(status: int) -> Reply:
    body = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": f"upstream {status}"}})
    return Reply(status=status, headers=JSON, chunks=[body])


def _primary(recorded: Recorded) -> Reply:
    model = recorded.json()["model"]
    if model == "up-limited":
        return _error(429)
    if model in ("up-failing", "up-doomed"):
        return _error(500)
    if model == "up-busy":
        return _error(529)
    if model == "up-refused":
        return _error(401)
    if model == "up-cut":
        return Reply(chunks=[SSE_BODY[:120]], cut=True)
    return _answer(model, 100, 20)


def _secondary(recorded: Recorded) -> Reply:
    model = recorded.json()["model"]
    return _error(500) if model == "up-doomed" else _answer(model, 50, 10)


async def _two_channels(
    start_gateway: GatewayFactory, make_upstream: Any, tmp_path: Path, **settings: Any
) -> Any:
    a, b = await make_upstream(), await make_upstream()
    a.reply, b.reply = _primary, _secondary
    return await start_gateway(
        channel("primary", a.url, modelMapping=MAPPING, priority=1),
        channel("secondary", b.url, modelMapping=MAPPING, priority=2),
        settings=make_settings(admin_keys=(ADMIN_KEY,), data_dir=str(tmp_path), **settings),
        prices=PRICES,
    )


class Finished:
    """Counts the records the observers got: a request's numbers are in once it is here."""

    def __init__(self, client: Any) -> None:
        self.count = 0
        client.server.app[GATEWAY].team.observers.append(self)

    def __call__(self, record: Record) -> None:
        self.count += 1

    async def wait(self, count: int) -> None:
        for _ in range(400):
            if self.count >= count:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{self.count} requests finished, expected {count}")


async def _post(client: Any, model: str, stream: bool = False, headers: dict[str, str] | None = None) -> int:
    resp = await client.post("/v1/messages", data=message_body(model, stream=stream), headers=headers or AUTH)
    await resp.read()
    return int(resp.status)


async def _scrape(client: Any, headers: dict[str, str] | None = None) -> dict[str, Series]:
    resp = await client.get("/metrics", headers=headers or {"x-api-key": ADMIN_KEY})
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(text)


def parse(text: str) -> dict[str, Series]:
    """sample name -> {sorted labels: value}."""
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs.items()))


def by(series: Series, name: str) -> dict[str, float]:
    """One label's values -> the sum of the series that carry them."""
    out: dict[str, float] = {}
    for key, value in series.items():
        label = dict(key)[name]
        out[label] = out.get(label, 0.0) + value
    return out


# ------------------------------------------------------------------ the scripted mix


async def test_a_scripted_mix_of_requests_gives_exact_counters(
    start_gateway: GatewayFactory, make_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ccx_proxy.access")
    client = await _two_channels(start_gateway, make_upstream, tmp_path)
    finished = Finished(client)
    assert await _post(client, "claude-alpha") == 200  # served by primary
    assert await _post(client, "claude-alpha") == 200
    assert await _post(client, "claude-alpha", headers={"x-api-key": "wrong"}) == 401  # never counted
    assert await _post(client, "claude-limited") == 200  # primary 429 -> secondary
    assert await _post(client, "claude-failing") == 200  # primary 500 -> secondary
    assert await _post(client, "claude-cut", stream=True) == 200  # primary cuts the stream
    bad = await client.post("/v1/messages", data=b"{not json", headers=AUTH)  # refused by the gateway
    assert bad.status == 400
    assert await _post(client, "claude-busy") == 200  # primary 529 -> secondary (primary backs off)
    await finished.wait(7)

    m = await _scrape(client)
    assert m["ccx_requests_total"] == {
        labels(channel="primary", model="up-alpha", code="200"): 2,
        labels(channel="secondary", model="up-limited", code="200"): 1,
        labels(channel="secondary", model="up-failing", code="200"): 1,
        labels(channel="primary", model="up-cut", code="200"): 1,
        labels(channel="", model="", code="400"): 1,
        labels(channel="secondary", model="up-busy", code="200"): 1,
    }
    assert m["ccx_request_outcomes_total"] == {
        labels(channel="primary", outcome="complete"): 2,
        labels(channel="primary", outcome="upstream_cut"): 1,
        labels(channel="secondary", outcome="complete"): 3,
        labels(channel="", outcome="error"): 1,
    }
    attempts = m["ccx_upstream_attempts_total"]
    assert {k: v for k, v in attempts.items() if v} == {
        labels(channel="primary", outcome="success"): 3,
        labels(channel="primary", outcome="rate_limited"): 1,
        labels(channel="primary", outcome="failed"): 1,
        labels(channel="primary", outcome="overloaded"): 1,
        labels(channel="secondary", outcome="success"): 3,
    }
    assert len(attempts) == 10  # every outcome of both channels, zeros included
    assert m["ccx_request_ttfb_seconds_count"] == {
        labels(channel="primary"): 3,
        labels(channel="secondary"): 3,
    }
    assert m["ccx_request_duration_seconds_count"] == {
        labels(channel="primary"): 3,
        labels(channel="secondary"): 3,
        labels(channel=""): 1,
    }
    inf = labels(channel="primary", le="+Inf")
    assert m["ccx_request_ttfb_seconds_bucket"][inf] == 3
    tokens = m["ccx_tokens_total"]
    assert tokens[labels(channel="primary", model="up-alpha", type="input")] == 200
    assert tokens[labels(channel="primary", model="up-alpha", type="output")] == 40
    assert tokens[labels(channel="primary", model="up-alpha", type="cache_read")] == 0
    assert by(tokens, "type") == {
        "input": 350,
        "output": 70,
        "cache_write_5m": 0,
        "cache_write_1h": 0,
        "cache_read": 0,
    }
    cost = m["ccx_cost_usd_total"]
    assert cost[labels(channel="primary", model="up-alpha")] == pytest.approx(2 * (100 * 3 + 20 * 15) / 1e6)
    assert cost[labels(channel="secondary", model="up-busy")] == pytest.approx((50 * 3 + 10 * 15) / 1e6)
    assert m["ccx_active_streams"] == {(): 0}
    # primary backs off after its 529, and its one key cools down after the 429
    assert m["ccx_channel_available"] == {labels(channel="primary"): 0, labels(channel="secondary"): 1}
    masked = "sk-…wxyz"
    assert m["ccx_key_available"] == {
        labels(channel="primary", key=masked): 0,
        labels(channel="secondary", key=masked): 1,
    }
    assert m["ccx_config_reloads_total"] == {labels(result="success"): 0, labels(result="rejected"): 0}
    assert m["ccx_usage_records_dropped_total"] == {(): 0}
    assert "ccx_member_requests_total" not in m  # METRICS_PER_MEMBER is off
    assert "process_resident_memory_bytes" in m

    # The same mix in the JSON access log: one line per request (the 401 and the gateway's
    # own 400 included), the failovers and the cut stream visible, no key anywhere.
    formatter = JsonFormatter()
    lines = [
        orjson.loads(formatter.format(r))
        for r in caplog.records
        if r.name == "ccx_proxy.access" and getattr(r, "access", {}).get("path") == "/v1/messages"
    ]
    assert [(d["status"], d.get("channel"), d.get("attempts")) for d in lines] == [
        (200, "primary", 1),
        (200, "primary", 1),
        (401, None, None),
        (200, "secondary", 2),
        (200, "secondary", 2),
        (200, "primary", 1),
        (400, None, 0),  # the member is known: refused by the gateway before any attempt
        (200, "secondary", 2),
    ]
    assert [d.get("outcome") for d in lines] == [None, None, None, None, None, "upstream_cut", "error", None]
    assert lines[0]["tokens"]["input"] == 100 and lines[0]["logger"] == "ccx_proxy.access"
    text = "\n".join(formatter.format(r) for r in caplog.records)
    assert UPSTREAM_KEY not in text and ACCESS_KEY not in text


async def test_a_key_the_upstream_rejects_is_counted_and_shown_unavailable(
    start_gateway: GatewayFactory, make_upstream: Any, tmp_path: Path
) -> None:
    client = await _two_channels(start_gateway, make_upstream, tmp_path)
    finished = Finished(client)
    assert await _post(client, "claude-refused") == 200  # primary 401 -> secondary
    assert await _post(client, "claude-doomed") == 500  # both fail: the last answer goes back
    await finished.wait(2)
    m = await _scrape(client)
    attempts = {k: v for k, v in m["ccx_upstream_attempts_total"].items() if v}
    assert attempts == {
        labels(channel="primary", outcome="rejected"): 1,
        labels(channel="secondary", outcome="success"): 1,
        labels(channel="secondary", outcome="failed"): 1,
    }
    assert m["ccx_requests_total"] == {
        labels(channel="secondary", model="up-refused", code="200"): 1,
        labels(channel="secondary", model="claude-doomed", code="500"): 1,  # no upstream model yet
    }
    assert m["ccx_key_available"][labels(channel="primary", key="sk-…wxyz")] == 0
    assert m["ccx_channel_available"][labels(channel="primary")] == 0  # no usable key left


async def test_streams_in_flight_are_counted_while_they_last(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    release = asyncio.Event()

    async def gate(_: int) -> None:
        await release.wait()

    first = SSE_BODY.index(b"\n\n") + 2  # the gateway answers once the first event is whole
    fake_upstream.reply = Reply(chunks=[SSE_BODY[:first], SSE_BODY[first:]], gate=gate)
    client = await start_gateway(
        channel("up", fake_upstream.url), settings=make_settings(admin_keys=(ADMIN_KEY,))
    )
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    assert resp.status == 200
    assert (await _scrape(client))["ccx_active_streams"] == {(): 1}
    release.set()
    await resp.read()
    for _ in range(100):
        if (await _scrape(client))["ccx_active_streams"] == {(): 0}:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stream is still counted as active")


async def test_keys_that_share_a_mask_are_two_series(start_gateway: GatewayFactory) -> None:
    keys = ["sk-first-aaaa-1234wxyz", "sk-second-bbbb-5678wxyz"]
    client = await start_gateway(
        {**channel("up"), "apiKeys": keys}, settings=make_settings(admin_keys=(ADMIN_KEY,))
    )
    m = await _scrape(client)
    assert m["ccx_key_available"] == {
        labels(channel="up", key="sk-…wxyz"): 1,
        labels(channel="up", key="sk-…wxyz#2"): 1,
    }


# ------------------------------------------------------------------ access


@pytest.mark.parametrize(
    ("env", "headers", "status"),
    [
        pytest.param({}, {}, 401, id="no-token"),
        pytest.param({}, {"authorization": "Bearer nope"}, 401, id="wrong-token"),
        pytest.param({}, {"x-api-key": ADMIN_KEY}, 200, id="admin-key-x-api-key"),
        pytest.param({}, {"authorization": f"Bearer {ADMIN_KEY}"}, 200, id="admin-key-bearer"),
        pytest.param(
            {"METRICS_TOKEN": METRICS_TOKEN}, {"authorization": f"Bearer {METRICS_TOKEN}"}, 200, id="token"
        ),
        pytest.param(
            {"METRICS_TOKEN": METRICS_TOKEN}, {"x-api-key": METRICS_TOKEN}, 200, id="token-x-api-key"
        ),
        pytest.param(
            {"METRICS_TOKEN": METRICS_TOKEN}, {"x-api-key": ADMIN_KEY}, 200, id="token-set-admin-key"
        ),
        pytest.param({"METRICS_PUBLIC": "true"}, {}, 200, id="public"),
        pytest.param({"METRICS_PUBLIC": "false"}, {}, 401, id="public-false"),
    ],
)
async def test_metrics_access(
    start_gateway: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    headers: dict[str, str],
    status: int,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = await start_gateway(channel(), settings=make_settings(admin_keys=(ADMIN_KEY,)))
    resp = await client.get("/metrics", headers=headers)
    body = await resp.read()
    assert resp.status == status, body
    if status == 401:
        message = assert_anthropic_error(resp.status, body, "authentication_error")
        assert "METRICS_TOKEN" in message
        assert ADMIN_KEY not in message
    else:
        assert b"ccx_requests_total" in body


async def test_metrics_without_any_token_configured_explains_how(start_gateway: GatewayFactory) -> None:
    client = await start_gateway(channel())  # no ADMIN_ACCESS_KEY, no METRICS_TOKEN
    resp = await client.get("/metrics", headers=AUTH)  # the proxy key is not a metrics token
    message = assert_anthropic_error(resp.status, await resp.read(), "authentication_error")
    assert resp.status == 401
    assert "METRICS_TOKEN" in message and "METRICS_PUBLIC" in message


async def test_overview_takes_the_admin_key_only(start_gateway: GatewayFactory, monkeypatch: Any) -> None:
    monkeypatch.setenv("METRICS_TOKEN", METRICS_TOKEN)
    client = await start_gateway(channel(), settings=make_settings(admin_keys=(ADMIN_KEY,)))
    for headers in ({}, {"x-api-key": METRICS_TOKEN}, AUTH):
        resp = await client.get("/api/overview", headers=headers)
        assert_anthropic_error(resp.status, await resp.read(), "authentication_error")
        assert resp.status == 401
    resp = await client.get("/api/overview", headers={"x-api-key": ADMIN_KEY})
    assert resp.status == 200


# ------------------------------------------------------------------ bounded labels, per member


def _record(channel: str | None, model: str | None, status: int = 200, member: str = "shared") -> Record:
    return Record(
        time.time(),
        "id",
        member,
        None,
        "messages",
        channel,
        None,
        model,
        model,
        0,
        status,
        None,
        "complete",
        1,
        120.0,
        300.0,
        10,
        2,
        0,
        0,
        0,
        None,
    )


async def test_label_values_are_bounded(start_gateway: GatewayFactory, monkeypatch: Any) -> None:
    monkeypatch.setenv("METRICS_PER_MEMBER", "true")
    client = await start_gateway(channel(), settings=make_settings(admin_keys=(ADMIN_KEY,)))
    meter = client.server.app[EXPORTER].meter
    for i in range(3 * MAX_LABEL_VALUES):
        # passthrough model names a client makes up, and many members
        meter.observe(_record(f"ch-{i % 3}", f"made-up-{i}", member=f"member-{i}"))
    for i in range(CACHE_LIMIT + 10):
        meter.observe(_record("ch-0", f"again-{i}", member="member-0"))
    assert len(meter._cache) <= CACHE_LIMIT and len(meter._member_cache) <= CACHE_LIMIT
    m = await _scrape(client)
    requests = m["ccx_requests_total"]
    models = {dict(k)["model"] for k in requests}
    assert len(models) == MAX_LABEL_VALUES + 1 and OTHER in models
    assert sum(requests.values()) == 3 * MAX_LABEL_VALUES + CACHE_LIMIT + 10
    assert by(requests, "channel") == {
        "ch-0": MAX_LABEL_VALUES + CACHE_LIMIT + 10,
        "ch-1": MAX_LABEL_VALUES,
        "ch-2": MAX_LABEL_VALUES,
    }
    members = m["ccx_member_requests_total"]
    assert len(members) == MAX_LABEL_VALUES + 1
    assert members[labels(member=OTHER)] == 2 * MAX_LABEL_VALUES
    assert len({dict(k)["model"] for k in m["ccx_tokens_total"]}) <= MAX_LABEL_VALUES + 1
    assert by(m["ccx_member_tokens_total"], "type")["input"] == 10 * (3 * MAX_LABEL_VALUES + CACHE_LIMIT + 10)


def test_a_label_cap_passes_the_first_values_then_other() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]


async def test_per_member_counters_when_asked(
    start_gateway: GatewayFactory, make_upstream: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("METRICS_PER_MEMBER", "true")
    client = await _two_channels(start_gateway, make_upstream, tmp_path)
    finished = Finished(client)
    resp = await client.post("/api/members", json={"name": "alice"}, headers={"x-api-key": ADMIN_KEY})
    key = (await resp.json())["key"]
    assert await _post(client, "claude-alpha", headers={"x-api-key": key}) == 200
    assert await _post(client, "claude-alpha", headers={"x-api-key": key}) == 200
    assert await _post(client, "claude-limited") == 200  # the shared key
    await finished.wait(3)
    m = await _scrape(client)
    assert m["ccx_member_requests_total"] == {labels(member="alice"): 2, labels(member="shared"): 1}
    tokens = m["ccx_member_tokens_total"]
    assert tokens[labels(member="alice", type="input")] == 200
    assert tokens[labels(member="alice", type="output")] == 40
    assert tokens[labels(member="shared", type="input")] == 50


async def test_an_observer_failure_never_reaches_the_request(caplog: Any) -> None:
    meter = Meter()
    bad = _record("up", "m")._replace(duration_ms="not a number")  # type: ignore[arg-type]
    meter.observe(bad)
    meter.observe(bad)
    assert caplog.text.count("could not be counted") == 1


# ------------------------------------------------------------------ reloads, dropped records


async def test_reloads_and_dropped_records_are_counted(tmp_path: Path, aiohttp_client: Any) -> None:
    path = tmp_path / "channels.json"
    path.write_text(json.dumps({"channels": [channel("a")]}))
    settings = make_settings(admin_keys=(ADMIN_KEY,), channels_file=str(path), watch_interval=0)
    app = create_app(settings, load_config(path))
    client = await aiohttp_client(app, server_kwargs=server_kwargs(settings))
    assert client.server.runner.server is not None
    install(client.server.runner.server, settings)
    watcher = app[WATCHER]
    path.write_text(json.dumps({"channels": [channel("a"), channel("b")]}))
    assert watcher.reload("test")
    path.write_text("{broken")
    assert not watcher.reload("test")
    assert not watcher.reload("test")
    app[GATEWAY].team.recorder.dropped = 7
    m = await _scrape(client)
    assert m["ccx_config_reloads_total"] == {labels(result="success"): 1, labels(result="rejected"): 2}
    assert m["ccx_usage_records_dropped_total"] == {(): 7}
    assert set(m["ccx_channel_available"]) == {labels(channel="a"), labels(channel="b")}


# ------------------------------------------------------------------ the overview


def test_quantiles_interpolate_within_buckets_like_promql() -> None:
    inf = float("inf")
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (inf, 40.0)]
    assert quantile(0.25, buckets) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert quantile(0.5, buckets) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert quantile(0.95, buckets) == pytest.approx(0.5 + 0.5 * 8 / 10)
    assert quantile(0.99, [(0.1, 1.0), (inf, 10.0)]) == 0.1  # in +Inf: the last bound known
    assert quantile(0.5, [(0.1, 0.0), (inf, 0.0)]) is None


async def test_overview_rates_error_rate_and_ttfb_over_the_last_minute(
    start_gateway: GatewayFactory, make_upstream: Any, tmp_path: Path
) -> None:
    client = await _two_channels(start_gateway, make_upstream, tmp_path)
    finished = Finished(client)
    admin = {"x-api-key": ADMIN_KEY}
    first = await (await client.get("/api/overview", headers=admin)).json()
    assert first["window"] is None and first["totals"]["rps"] is None  # one look: no rate yet
    assert [c["name"] for c in first["channels"]] == ["primary", "secondary"]
    for model in ("claude-alpha", "claude-alpha", "claude-alpha", "claude-doomed"):
        await _post(client, model)
    await finished.wait(4)
    await asyncio.sleep(0.05)
    view = await (await client.get("/api/overview", headers=admin)).json()
    totals = view["totals"]
    assert view["window"] > 0 and view["workers"] == "this process"
    assert totals["requests"] == 4
    assert totals["rps"] == pytest.approx(4 / view["window"], rel=0.01)
    assert totals["errorRate"] == 0.25  # the 500 after both channels failed
    assert 0 < totals["ttfbP50Ms"] <= 25 and totals["ttfbP50Ms"] <= totals["ttfbP95Ms"]
    assert (totals["activeStreams"], totals["channels"], totals["channelsAvailable"]) == (0, 2, 2)
    primary, secondary = view["channels"]
    assert (primary["requests"], secondary["requests"]) == (3, 1)
    assert (primary["errorRate"], secondary["errorRate"]) == (0.0, 1.0)
    assert primary["available"] is True and primary["status"] == "active"
    assert primary["outputTokensPerS"] == pytest.approx(60 / view["window"], rel=0.01)
    assert secondary["ttfbP50Ms"] is None  # its one request got no answer it could pass on
    assert len(view["series"]) == 1 and view["series"][0]["rps"] == pytest.approx(totals["rps"], rel=0.01)


# ------------------------------------------------------------------ --workers N: multiprocess files


def test_prepare_workers_empties_a_named_directory_or_makes_one(tmp_path: Path) -> None:
    named = tmp_path / "named"
    named.mkdir()
    (named / "counter_123.db").write_bytes(b"old")
    (named / "keep.txt").write_text("not ours")
    env = {MULTIPROC_ENV: str(named)}
    cleanup = prepare_workers(env)
    assert not (named / "counter_123.db").exists() and (named / "keep.txt").exists()
    cleanup()
    assert named.exists()
    env = {}
    cleanup = prepare_workers(env)
    made = Path(env[MULTIPROC_ENV])
    assert made.is_dir()
    cleanup()
    assert not made.exists()


async def test_workers_publish_to_files_that_add_up(
    start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers simulated in one process (two gateways, each with its own process id for
    prometheus-client's files): a scrape on either sees the sum."""
    multiproc_dir = tmp_path / "metrics"
    env = {MULTIPROC_ENV: str(multiproc_dir)}
    settings = make_settings(admin_keys=(ADMIN_KEY,))
    gateways = [(await start_gateway(channel("a"), channel("b"), settings=settings)).server.app[GATEWAY]]
    gateways.append((await start_gateway(channel("a"), channel("b"), settings=settings)).server.app[GATEWAY])
    # prometheus-client names its files from the variable (set now: the gateways' own
    # exporters, made at start-up, stay single-process and write nothing there)
    monkeypatch.setenv(MULTIPROC_ENV, str(multiproc_dir))
    classes = [values.MultiProcessValue(lambda: 101), values.MultiProcessValue(lambda: 102)]
    workers = [(gw, Exporter(gw, env, value_class=c)) for gw, c in zip(gateways, classes, strict=True)]
    try:
        (gw1, ex1), (gw2, ex2) = workers
        for _ in range(3):
            ex1.meter.observe(_record("a", "m1"))
        for _ in range(2):
            ex2.meter.observe(_record("a", "m1"))
        ex2.meter.observe(_record("b", "m2", status=529))
        gw1.streams, gw2.streams = 2, 3
        gw2.health.channel("b", gw2.runtime.config.channels[1].breaker).backoff_until = (
            gw2.health.clock() + 60
        )
        ex2.publish()  # worker 2's periodic write; worker 1 publishes as it is scraped
        m = parse((await ex1.render()).decode())
        assert sorted(os.path.basename(p) for p in glob.glob(str(multiproc_dir / "*.db"))) == [
            "counter_101.db",
            "counter_102.db",
            "gauge_livemin_101.db",
            "gauge_livemin_102.db",
            "gauge_livesum_101.db",
            "gauge_livesum_102.db",
            "histogram_101.db",
            "histogram_102.db",
        ]
        assert m["ccx_requests_total"] == {
            labels(channel="a", model="m1", code="200"): 5,
            labels(channel="b", model="m2", code="529"): 1,
        }
        assert m["ccx_request_ttfb_seconds_count"] == {labels(channel="a"): 5, labels(channel="b"): 1}
        assert m["ccx_request_ttfb_seconds_bucket"][labels(channel="a", le="0.1")] == 0
        assert m["ccx_request_ttfb_seconds_bucket"][labels(channel="a", le="0.25")] == 5  # 120 ms
        assert m["ccx_request_ttfb_seconds_sum"][labels(channel="a")] == pytest.approx(0.6)
        assert m["ccx_tokens_total"][labels(channel="a", model="m1", type="input")] == 50
        assert m["ccx_active_streams"] == {(): 5}
        # available only where every worker can use it: worker 2 backs off from b
        assert m["ccx_channel_available"] == {labels(channel="a"): 1, labels(channel="b"): 0}
        assert "process_resident_memory_bytes" not in m  # one worker's would mislead

        # the overview reads the same sums
        await ex1.overview_view()
        ex2.meter.observe(_record("a", "m1"))
        ex2.publish()
        await asyncio.sleep(0.01)
        view = await ex1.overview_view()
        assert view["workers"] == "all" and view["totals"]["requests"] == 7
        assert view["totals"]["activeStreams"] == 5

        # a channel removed by a reload: its gauge can only turn NaN in the files
        for gateway in (gw1, gw2):
            config = gateway.runtime.config
            gateway.apply(dataclasses.replace(config, channels=config.channels[:1]))
        ex2.publish()
        m = parse((await ex1.render()).decode())
        assert m["ccx_channel_available"][labels(channel="a")] == 1
        assert math.isnan(m["ccx_channel_available"][labels(channel="b")])
    finally:
        for value_class in classes:
            value_class.close_all_files()


async def test_a_worker_publishes_every_second_and_as_it_stops(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, tmp_path: Path, monkeypatch: Any
) -> None:
    directory = tmp_path / "metrics"
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    monkeypatch.setenv("METRICS_PUBLIC", "true")
    client = await start_gateway(channel("up", fake_upstream.url))
    finished = Finished(client)
    assert await _post(client, "claude-sonnet-4-5") == 200
    await finished.wait(1)
    exporter = client.server.app[EXPORTER]
    collector = exporter.collector
    assert exporter.publisher is not None and exporter.process is None

    def requests() -> float:
        return sum(s.value for f in collector.collect() for s in f.samples if s.name == "ccx_requests_total")

    for _ in range(40):  # the background write, without a scrape
        if requests() == 1:
            break
        await asyncio.sleep(0.05)
    assert requests() == 1
    assert sorted(p.name.split("_")[0] for p in directory.iterdir()) == [
        "counter",
        "gauge",
        "gauge",
        "histogram",
    ]
    exporter.meter.observe(_record("up", "late"))
    await client.close()  # the app stops: its last numbers are written
    assert requests() == 2


def _served_per_worker(directory: Path) -> dict[str, float]:
    """Each worker's own file: its ccx_requests_total."""
    served = {}
    for path in glob.glob(str(directory / "counter_*.db")):
        entries = MmapedDict.read_all_values_from_file(path)
        served[path] = sum(v for key, v, _, _ in entries if json.loads(key)[1] == "ccx_requests_total")
    return served


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT: Linux")
async def test_serve_with_two_workers_scrapes_the_sum(aiohttp_server: Any, tmp_path: Path) -> None:
    """``serve --workers 2`` for real, with PROMETHEUS_MULTIPROC_DIR set as the supervisor
    sets it: whichever worker answers a scrape, it shows every worker's requests."""
    upstream = await aiohttp_server(MockUpstream(UPSTREAM_KEY).app())
    config = tmp_path / "channels.json"
    config.write_text(json.dumps({"channels": [channel("mock", str(upstream.make_url("")).rstrip("/"))]}))
    directory = tmp_path / "metrics"
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_ACCESS_KEY", "WORKERS", "PORT")}
    env.update(PROXY_ACCESS_KEY="workers-key", METRICS_TOKEN=METRICS_TOKEN, DATA_DIR=str(tmp_path / "data"))
    env[MULTIPROC_ENV] = str(directory)
    port = unused_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ccx_proxy",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each: both workers serve
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(200):
                try:
                    async with session.get(f"{base}/health"):
                        break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None
                    await asyncio.sleep(0.05)
            body = {
                "model": "claude-sonnet-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}],
            }
            # Until both workers have served (the second may still be starting), then the sum.
            sent, deadline = 0, time.monotonic() + 20
            while True:
                for _ in range(10):
                    async with session.post(
                        f"{base}/v1/messages", json=body, headers={"x-api-key": "workers-key"}
                    ) as r:
                        assert r.status == 200
                        await r.read()
                    sent += 1
                await asyncio.sleep(metrics.PUBLISH_INTERVAL + 0.3)
                served = _served_per_worker(directory)
                if len(served) == 2 and all(served.values()):
                    break
                assert time.monotonic() < deadline, served
            for _ in range(8):  # whichever worker answers
                async with session.get(
                    f"{base}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
                ) as r:
                    assert r.status == 200
                    m = parse(await r.text())
                assert sum(m["ccx_requests_total"].values()) == sent
                assert sum(m["ccx_upstream_attempts_total"].values()) == sent
                assert m["ccx_active_streams"] == {(): 0}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0, stderr
    assert METRICS_TOKEN not in stderr


def test_a_metrics_flag_typo_stops_serve() -> None:
    from ccx_proxy.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="METRICS_PUBLIC must be true or false, not 'ture'"):
        Settings.from_env({"PROXY_ACCESS_KEY": "k" * 32, "METRICS_PUBLIC": "ture"})
