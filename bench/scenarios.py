"""The seven scenarios.  Each runs the same load direct to the upstream and through the
gateway in the same run, alternating (6 and 7: two gateway setups against each other), and
returns plain figures (report.py turns them into the table)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import latency as lat
import loadgen
from http1 import build_request
from procs import Proc, cpu_list, find_program, free_port, python

BENCH = Path(__file__).resolve().parent
ACCESS_KEY = "ccx-bench-access-key"
UPSTREAM_KEY = "bench-upstream-key"
CURVE = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)  # percentiles kept for the plot

# What Claude Code sends besides the key (so header handling costs what it costs in real use).
CLIENT_HEADERS = {
    "accept": "application/json",
    "anthropic-beta": (
        "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
    ),
    "anthropic-dangerous-direct-browser-access": "true",
    "anthropic-version": "2023-06-01",
    "content-type": "application/json",
    "user-agent": "claude-cli/2.1.197 (external, cli)",
    "x-app": "cli",
    "x-stainless-arch": "x64",
    "x-stainless-lang": "js",
    "x-stainless-os": "Linux",
    "x-stainless-package-version": "0.60.0",
    "x-stainless-retry-count": "0",
    "x-stainless-runtime": "node",
    "x-stainless-runtime-version": "v22.17.0",
    "x-stainless-timeout": "600",
    "x-claude-code-session-id": "7f1c2a9e-3b4d-4e5f-8a6b-9c0d1e2f3a4b",
}


@dataclass
class Ctx:
    quick: bool
    tmp: Path
    wrk: str | None
    gw_cpus: list[int]
    load_cpus: list[int]
    all_cpus: list[int]
    upstream_port: int
    small: bytes
    big: bytes
    stream_runs: list[tuple[int, int]] | None = None  # (streams, ms between events)
    baseline_ref: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # a target's client key, if not ACCESS_KEY

    def headers(self, target: str) -> dict[str, str]:
        key = UPSTREAM_KEY if target == "direct" else self.keys.get(target, ACCESS_KEY)
        return {**CLIENT_HEADERS, "x-api-key": key}

    def request(self, target: str, body: bytes) -> bytes:
        port = self.ports[target]
        return build_request("/v1/messages", f"127.0.0.1:{port}", self.headers(target), body)

    def start_gateway(
        self,
        name: str,
        workers: int = 1,
        cpus: list[int] | None = None,
        source: Path | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> int:
        """A gateway process; ``source``: another checkout's src/ to run instead of this one."""
        port = free_port()
        argv = [python(), "-m", "ccx_proxy", "serve", "--config", str(self.tmp / "channels.json")]
        argv += ["--port", str(port)] + (["--workers", str(workers)] if workers > 1 else [])
        env = {"PROXY_ACCESS_KEY": ACCESS_KEY, "LOG_LEVEL": "WARNING", "WORKERS": ""}
        if source is not None:
            env["PYTHONPATH"] = str(source)
        env.update(env_extra or {})
        self.procs[name] = Proc(name, argv, cpus or self.gw_cpus, self.tmp, env, port)
        self.ports[name] = port
        return port

    def stop(self, name: str) -> None:
        self.procs.pop(name).stop()

    def load(self, target: str, connections: int, seconds: float, body: bytes = b"") -> dict[str, float]:
        body = body or self.small
        if self.wrk is None:
            return loadgen.run_python(self.ports[target], connections, seconds, body, self.headers(target))
        body_file = self.tmp / f"body-{len(body)}.json"
        body_file.write_bytes(body)
        headers_file = self.tmp / f"headers-{target}.txt"
        headers_file.write_text("".join(f"{k}: {v}\n" for k, v in self.headers(target).items()))
        return loadgen.run_wrk(
            self.wrk, self.ports[target], connections, seconds, body_file, headers_file, self.load_cpus
        )


def _curve(values: list[float]) -> dict[str, float]:
    return {str(q): round(lat.percentile(values, q), 1) for q in CURVE}


def latency(ctx: Ctx) -> dict[str, object]:
    """1. One client, small streamed response: TTFB and total, direct vs gateway (vs naive)."""
    names = ["direct", "gateway"]
    names += [n for n in ("gateway_1core", "baseline", "naive", "floor") if n in ctx.ports]
    targets = [lat.Target(n, ctx.ports[n], ctx.request(n, ctx.small)) for n in names]
    rounds, warmup = (30, 5) if ctx.quick else (2000, 200)
    samples = lat.measure(targets, rounds, warmup)
    out: dict[str, object] = {"rounds": rounds}
    for name, s in samples.items():
        out[name] = {
            "ttfb_us": lat.summary(s.ttfb_us),
            "total_us": lat.summary(s.total_us),
            "ttfb_curve_us": _curve(s.ttfb_us),
            "total_curve_us": _curve(s.total_us),
            "errors": s.errors,
            "body_bytes": s.size,
        }
    # Paired differences (same round) are the least noisy estimate of what the gateway adds.
    d, g = samples["direct"], samples["gateway"]
    out["paired_added_ttfb_us_median"] = statistics.median(
        b - a for a, b in zip(d.ttfb_us, g.ttfb_us, strict=False)
    )
    return out


def throughput(ctx: Ctx) -> dict[str, object]:
    """2. Closed-loop load at 32, 64 and 128 connections: requests/s and gateway CPU per request;
    the aiohttp floor and the naive forwarder at 32 and 64."""
    levels = [32] if ctx.quick else [32, 64, 128]
    seconds = 1.0 if ctx.quick else 3.0
    rounds = 1 if ctx.quick else 2
    out: dict[str, object] = {"seconds": seconds, "rounds": rounds, "loadgen": "wrk" if ctx.wrk else "python"}
    gateway = ctx.procs["gateway"]
    for conns in levels:
        targets = ["direct", "gateway"] + (["baseline"] if "baseline" in ctx.ports else [])
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        if not ctx.quick:  # warm every path (connection pools, allocator) before measuring
            for target in targets:
                ctx.load(target, conns, 1.0)
        for r in range(rounds):
            for target in targets if r % 2 == 0 else targets[::-1]:
                proc = ctx.procs.get(target, gateway)
                cpu0, (_, sys0) = proc.cpu(), proc.cpu_split()
                result = ctx.load(target, conns, seconds)
                if target != "direct":
                    result["gateway_cpu_s"] = proc.cpu() - cpu0
                    result["gateway_system_share"] = (proc.cpu_split()[1] - sys0) / max(
                        1e-9, result["gateway_cpu_s"]
                    )
                    result["gateway_cpu_us_per_request"] = (
                        1e6 * result["gateway_cpu_s"] / max(1, result["requests"])
                    )
                runs[target].append(result)
        for reference in ("naive", "floor"):  # one run each, at 32 and 64 connections
            if conns in (32, 64) and reference in ctx.ports and not ctx.quick:
                ctx.load(reference, conns, 1.0)
                runs[reference] = [ctx.load(reference, conns, seconds)]
        out[f"c{conns}"] = {
            name: {
                "rps_median": statistics.median(x["rps"] for x in rs),
                "p50_us": statistics.median(x["p50_us"] for x in rs),
                "p99_us": statistics.median(x["p99_us"] for x in rs),
                "errors": sum(x["errors"] for x in rs),
                "runs": rs,
                **(
                    {
                        "cpu_us_per_request": statistics.median(x["gateway_cpu_us_per_request"] for x in rs),
                        "system_share": statistics.median(x["gateway_system_share"] for x in rs),
                    }
                    if name in ("gateway", "baseline")
                    else {}
                ),
            }
            for name, rs in runs.items()
        }
    return out


def big_bodies(ctx: Ctx) -> dict[str, object]:
    """3. ~110 KB Claude Code-shaped request bodies vs small ones, one client."""
    targets = [
        lat.Target("direct_small", ctx.ports["direct"], ctx.request("direct", ctx.small)),
        lat.Target("gateway_small", ctx.ports["gateway"], ctx.request("gateway", ctx.small)),
        lat.Target("direct_big", ctx.ports["direct"], ctx.request("direct", ctx.big)),
        lat.Target("gateway_big", ctx.ports["gateway"], ctx.request("gateway", ctx.big)),
    ]
    rounds, warmup = (20, 5) if ctx.quick else (1000, 100)
    samples = lat.measure(targets, rounds, warmup)
    p50 = {name: lat.percentile(s.total_us, 50) for name, s in samples.items()}
    added_small = p50["gateway_small"] - p50["direct_small"]
    added_big = p50["gateway_big"] - p50["direct_big"]
    return {
        "rounds": rounds,
        "big_body_bytes": len(ctx.big),
        "small_body_bytes": len(ctx.small),
        "total_p50_us": p50,
        "errors": sum(s.errors for s in samples.values()),
        "added_p50_small_us": added_small,
        "added_p50_big_us": added_big,
        "added_by_body_size_us": added_big - added_small,
    }


def _stream_run(
    ctx: Ctx, target: str, count: int, interval: int, window: float, watch: Proc | None
) -> dict[str, object]:
    argv = [python(), str(BENCH / "streams.py"), "--port", str(ctx.ports[target])]
    argv += ["--key", ctx.headers(target)["x-api-key"], "--count", str(count), "--window-s", str(window)]
    argv += ["--settle-s", "0.3" if ctx.quick else "1.0", "--interval-ms", str(interval)]
    if ctx.load_cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpu_list(ctx.load_cpus), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    assert proc.stdout is not None
    samples: dict[str, float] = {}
    if watch is not None:
        samples["rss_before"] = watch.rss()
    started = time.monotonic()
    last = ""
    for line in proc.stdout:
        last = line
        if watch is None:
            continue
        if line.startswith("WINDOW_START"):
            samples["cpu_start"], samples["t_start"] = watch.cpu(), time.monotonic()
            samples["sys_start"] = watch.cpu_split()[1]
            samples["rss_open"] = watch.rss()
        elif line.startswith("WINDOW_END"):
            samples["cpu_end"], samples["t_end"] = watch.cpu(), time.monotonic()
            samples["sys_end"] = watch.cpu_split()[1]
            samples["rss_open"] = max(samples["rss_open"], watch.rss())
    proc.wait(timeout=60)
    result: dict[str, object] = json.loads(last)
    result["wall_s"] = round(time.monotonic() - started, 2)
    if watch is not None:
        result["gateway_rss_before_mb"] = round(samples["rss_before"] / 2**20, 1)
        result["gateway_rss_open_mb"] = round(samples["rss_open"] / 2**20, 1)
        result["gateway_rss_per_stream_kb"] = round(
            (samples["rss_open"] - samples["rss_before"]) / 1024 / count, 2
        )
        elapsed = samples["t_end"] - samples["t_start"]
        result["gateway_cpu_percent"] = round(100 * (samples["cpu_end"] - samples["cpu_start"]) / elapsed, 1)
        # The kernel's share (send/recv system calls) of that CPU time.
        result["gateway_cpu_system_percent"] = round(
            100 * (samples["sys_end"] - samples["sys_start"]) / elapsed, 1
        )
    return result


def long_streams(ctx: Ctx) -> dict[str, object]:
    """4. Thousands of concurrent streams, an event every 50 ms each, on a fresh gateway."""
    runs = ctx.stream_runs or ([(20, 50)] if ctx.quick else [(2000, 50), (5000, 250)])
    window = 0.5 if ctx.quick else 4.0
    out: dict[str, object] = {"window_s": window}
    for count, interval in runs:
        ctx.start_gateway("streams_gateway")  # fresh: no memory left over from other scenarios
        try:
            ctx.ports["streams"] = ctx.ports["streams_gateway"]
            warm = lat.Target("streams", ctx.ports["streams"], ctx.request("gateway", ctx.small))
            lat.measure([warm], 50, 0)
            direct = _stream_run(ctx, "direct", count, interval, window, None)
            via = _stream_run(ctx, "streams", count, interval, window, ctx.procs["streams_gateway"])
        finally:
            ctx.stop("streams_gateway")
        out[f"{count}@{interval}"] = {
            "streams": count,
            "interval_ms": interval,
            "direct": direct,
            "gateway": via,
        }
    return out


def scaling(ctx: Ctx) -> dict[str, object]:
    """5. serve --workers N: throughput at N = 1, 2, ... (as many as there are cores)."""
    counts = [1, 2] if len(ctx.all_cpus) <= 2 else [n for n in (1, 2, 4, 8) if n < len(ctx.all_cpus)]
    seconds = 1.0 if ctx.quick else 3.0
    conns = 128
    out: dict[str, object] = {"connections": conns, "seconds": seconds}
    load_cpus = ctx.load_cpus
    for n in counts:
        free = len(ctx.all_cpus) >= n + 1
        cpus = ctx.all_cpus[:n] if free else ctx.all_cpus
        if free and len(ctx.all_cpus) > 2:  # the upstream and wrk get the cores the workers do not
            ctx.load_cpus = ctx.all_cpus[n:]
            for pid in ctx.procs["upstream"].pids:
                os.sched_setaffinity(pid, ctx.load_cpus)
        ctx.start_gateway(f"workers{n}", workers=n, cpus=cpus)
        try:
            name = f"workers{n}"
            if not ctx.quick:
                ctx.load(name, conns, 1.0)
            runs = [ctx.load(name, conns, seconds) for _ in range(1 if ctx.quick else 2)]
        finally:
            ctx.stop(f"workers{n}")
            if ctx.load_cpus != load_cpus:
                ctx.load_cpus = load_cpus
                for pid in ctx.procs["upstream"].pids:
                    os.sched_setaffinity(pid, load_cpus)
        out[str(n)] = {
            "rps_median": statistics.median(r["rps"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "cpus": cpu_list(cpus),
            "cores_free": free,
            "runs": runs,
        }
    return out


def team(ctx: Ctx) -> dict[str, object]:
    """6. Members and usage: the same build with no member and usage recording off, vs a
    member's key (hash lookup, limits checked, usage read from the stream and written to
    SQLite once a second), at 64 connections, alternating."""
    from ccx_proxy.team import db, members  # the tree under test (bench runs in its venv)

    off_dir, member_dir = ctx.tmp / "data-off", ctx.tmp / "data-member"
    conn = db.connect(db.path_in(member_dir))
    limits = members.Limits(rpm=100_000_000, maxConcurrent=100_000, dailyTokens=10**15)
    _, key = members.add(conn, "bench-member", limits=limits)
    conn.close()
    ctx.start_gateway("team_off", env_extra={"DATA_DIR": str(off_dir), "USAGE_RECORDING": "false"})
    ctx.start_gateway("team_member", env_extra={"DATA_DIR": str(member_dir)})
    ctx.keys["team_member"] = key
    conns = 64
    seconds = 1.0 if ctx.quick else 3.0
    rounds = 1 if ctx.quick else 3
    targets = ["team_off", "team_member"]
    try:
        runs = _alternate(ctx, targets, conns, seconds, rounds)
        rss = {t: ctx.procs[t].rss() for t in targets}
    finally:
        ctx.stop("team_off")
        ctx.stop("team_member")
    recorded = 0
    conn = db.connect(db.path_in(member_dir), create=False)
    try:
        recorded = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    finally:
        conn.close()
    return {
        "connections": conns,
        "seconds": seconds,
        "rounds": rounds,
        **{t: {**_summary(rs), "rss_bytes_end": rss[t]} for t, rs in runs.items()},
        "usage_rows_written": recorded,
    }


def redis(ctx: Ctx) -> dict[str, object]:
    """7. Shared limits in Redis (REDIS_URL): a member with no limits (no Redis), the same
    member with rpm, concurrency and a daily budget counted in the process, and counted in
    a real redis-server, at 64 connections, alternating.  Also: Redis commands per request."""
    import redis as redis_client  # the tree under test's venv

    from ccx_proxy.team import db, members

    binary = find_program("redis-server", "redis-server", install=not ctx.quick)
    if binary is None:
        return {"skipped": "redis-server is not installed (apt-get install redis-server)"}
    redis_port = free_port()
    ctx.procs["redis"] = Proc(
        "redis",
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        ctx.load_cpus,
        ctx.tmp,
        port=redis_port,
    )
    limits = members.Limits(rpm=100_000_000, maxConcurrent=100_000, dailyTokens=10**15)
    keys = {}
    for target, member_limits in (("limits_none", None), ("limits_local", limits), ("limits_redis", limits)):
        conn = db.connect(db.path_in(ctx.tmp / f"data-{target}"))
        _, keys[target] = members.add(conn, "bench-member", limits=member_limits)
        conn.close()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    targets = ["limits_none", "limits_local", "limits_redis"]
    for target in targets:
        extra = {"DATA_DIR": str(ctx.tmp / f"data-{target}")}
        if target == "limits_redis":
            extra["REDIS_URL"] = redis_url
        ctx.start_gateway(target, env_extra=extra)
        ctx.keys[target] = keys[target]
    conns = 64
    seconds = 1.0 if ctx.quick else 3.0
    rounds = 1 if ctx.quick else 3
    client = redis_client.Redis.from_url(redis_url)
    commands = 0

    def counting(target: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        nonlocal commands
        before = _calls(client)
        result = run()
        if target == "limits_redis":
            time.sleep(0.2)  # the last releases and spend
            commands += _calls(client) - before
        return result

    try:
        runs = _alternate(ctx, targets, conns, seconds, rounds, counting)
        redis_cpu = ctx.procs["redis"].cpu()
    finally:
        client.close()
        for target in targets:
            ctx.stop(target)
        ctx.stop("redis")
    answered = sum(x["requests"] - x["errors"] for x in runs["limits_redis"])
    return {
        "connections": conns,
        "seconds": seconds,
        "rounds": rounds,
        **{t: _summary(rs) for t, rs in runs.items()},
        "redis_calls_per_request": commands / max(1, answered),
        "redis_cpu_us_per_request": 1e6 * redis_cpu / max(1, answered),
    }


def _alternate(
    ctx: Ctx,
    targets: list[str],
    conns: int,
    seconds: float,
    rounds: int,
    wrap: Callable[[str, Callable[[], dict[str, float]]], dict[str, float]] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """A warm-up, then ``rounds`` loads of each target, the order reversed every other round,
    each with the gateway's CPU per request; ``wrap(target, run)`` may measure around a run."""
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    if not ctx.quick:
        for target in targets:
            ctx.load(target, conns, 1.0)
    for r in range(rounds):
        for target in targets if r % 2 == 0 else targets[::-1]:
            proc = ctx.procs[target]

            def run(target: str = target, proc: Proc = proc) -> dict[str, float]:
                cpu0 = proc.cpu()
                result = ctx.load(target, conns, seconds)
                result["cpu_us_per_request"] = 1e6 * (proc.cpu() - cpu0) / max(1, result["requests"])
                return result

            runs[target].append(wrap(target, run) if wrap is not None else run())
    return runs


def _summary(runs: list[dict[str, float]]) -> dict[str, object]:
    """One target's alternating runs: medians of rate and CPU, sums of requests and errors."""
    return {
        "rps_median": statistics.median(x["rps"] for x in runs),
        "cpu_us_per_request": statistics.median(x["cpu_us_per_request"] for x in runs),
        "requests": sum(x["requests"] for x in runs),
        "errors": sum(x["errors"] for x in runs),
        "runs": runs,
    }


def _calls(client: object) -> int:
    """Commands the gateways sent to Redis (EVALSHA counts once, not the commands its
    script runs; INFO, this bench's own, not at all)."""
    stats = client.info("commandstats")  # type: ignore[attr-defined]
    names = {k: k.removeprefix("cmdstat_").split("|")[0] for k in stats}
    return sum(v["calls"] for k, v in stats.items() if names[k] not in _IN_SCRIPTS and names[k] != "info")


# Commands only the gateway's Lua scripts run (counted by Redis as commands of their own).
_IN_SCRIPTS = {
    "zadd", "zrem", "zcard", "zrange", "zremrangebyscore", "hget", "hincrby", "hincrbyfloat",
    "expire", "pexpire", "time", "get", "hkeys",
}  # fmt: skip
