"""Turning the bench's figures into a Markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# The targets: one worker, same machine, same run.
TARGET_TTFB_ADDED_US = 100.0
TARGET_RPS_C32 = 10_000.0
TARGET_BODY_ADDED_US = 100.0
TARGET_RSS_PER_STREAM_KB = 20.0
TARGET_DELAY_ADDED_P99_US = 5_000.0
TARGET_SCALING = 0.8
TARGET_OVER_FLOOR_US = 60.0  # gateway TTFB p50 at one client, over the aiohttp floor
TARGET_FLOOR_SHARE = 0.5  # gateway requests/s at 64 connections, as a share of the floor


def us(value: float) -> str:
    if value != value:  # NaN
        return "—"
    if abs(value) >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.0f} µs"


def signed_us(value: float) -> str:
    return ("+" if value >= 0 else "−") + us(abs(value))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b and not math.isnan(a) and not math.isnan(b) else "—"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**met**" if ok else "**not met**")


Row = tuple[str, str, str, str, str, str, str, str]


class Table:
    """Rows of the results table: scenario, figure, direct, gateway, difference, ratio, target, verdict."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(
        self,
        scenario: str,
        figure: str,
        direct: str = "",
        gateway: str = "",
        diff: str = "",
        times: str = "",
        target: str = "",
        ok: bool | None = None,
    ) -> None:
        self.rows.append((scenario, figure, direct, gateway, diff, times, target, verdict(ok)))

    def latency(self, scenario: str, figure: str, direct: float, other: float, target: str = "") -> None:
        ok = other - direct <= TARGET_TTFB_ADDED_US if target else None
        self.add(
            scenario,
            figure,
            us(direct),
            us(other),
            signed_us(other - direct),
            ratio(other, direct),
            target,
            ok,
        )


def _latency_rows(t: Table, r: dict[str, Any], ref: str) -> None:
    name = "1 latency, 1 client"
    d, g = r["direct"], r["gateway"]
    target = f"≤ +{us(TARGET_TTFB_ADDED_US)}"
    for kind, label in (("ttfb_us", "TTFB"), ("total_us", "total")):
        for q in ("p50", "p99"):
            goal = target if (kind, q) == ("ttfb_us", "p50") else ""
            t.latency(name, f"{label} {q}", d[kind][q], g[kind][q], goal)
    if "gateway_1core" in r:
        for kind, label in (("ttfb_us", "TTFB"), ("total_us", "total")):
            goal = target if kind == "ttfb_us" else ""
            figure = f"{label} p50, gateway on the client's core"
            t.latency(name, figure, d[kind]["p50"], r["gateway_1core"][kind]["p50"], goal)
    if "baseline" in r:
        for kind, label in (("ttfb_us", "TTFB"), ("total_us", "total")):
            t.latency(
                name, f"{label} p50, gateway as of {ref} (before)", d[kind]["p50"], r["baseline"][kind]["p50"]
            )
    for key, label in (
        ("floor", "aiohttp handler with no upstream (floor)"),
        ("naive", "naive aiohttp forwarder (reference)"),
    ):
        if key in r:
            t.latency(name, f"TTFB p50, {label}", d["ttfb_us"]["p50"], r[key]["ttfb_us"]["p50"])
    if "floor" in r:
        over = g["ttfb_us"]["p50"] - r["floor"]["ttfb_us"]["p50"]
        t.add(
            name,
            "TTFB p50, gateway minus the floor",
            us(r["floor"]["ttfb_us"]["p50"]),
            us(g["ttfb_us"]["p50"]),
            signed_us(over),
            "",
            f"≤ +{TARGET_OVER_FLOOR_US} µs",
            over <= TARGET_OVER_FLOOR_US,
        )


def _throughput_rows(t: Table, s: dict[str, Any], ref: str) -> None:
    for level, r in s.items():
        if not level.startswith("c"):
            continue
        d, g = r["direct"], r["gateway"]
        name = f"2 throughput, {level[1:]} conns"
        drps = d["rps_median"]
        target, ok = (
            (f"≥ {TARGET_RPS_C32:,.0f}/s", g["rps_median"] >= TARGET_RPS_C32)
            if level == "c32"
            else ("", None)
        )
        t.add(
            name,
            "requests/s (median of runs)",
            f"{drps:,.0f}",
            f"{g['rps_median']:,.0f}",
            "",
            ratio(g["rps_median"], drps),
            target,
            ok,
        )
        t.add(
            name,
            "latency p50 / p99 under load",
            f"{us(d['p50_us'])} / {us(d['p99_us'])}",
            f"{us(g['p50_us'])} / {us(g['p99_us'])}",
        )
        cpu = f"{us(g['cpu_us_per_request'])} ({100 * g['system_share']:.0f}% in the kernel)"
        t.add(name, "gateway CPU per request", gateway=cpu)
        if "baseline" in r:
            b = r["baseline"]
            t.add(
                name,
                f"requests/s, gateway as of {ref} (before)",
                f"{drps:,.0f}",
                f"{b['rps_median']:,.0f}",
                times=ratio(b["rps_median"], drps),
            )
            t.add(name, f"gateway CPU per request as of {ref} (before)", gateway=us(b["cpu_us_per_request"]))
        for key, label in (
            ("floor", "aiohttp handler with no upstream (floor)"),
            ("naive", "naive aiohttp forwarder (reference)"),
        ):
            if key in r:
                n = r[key]["rps_median"]
                t.add(name, f"requests/s, {label}", f"{drps:,.0f}", f"{n:,.0f}", times=ratio(n, drps))
        if "floor" in r:
            share = g["rps_median"] / max(1.0, r["floor"]["rps_median"])
            goal = f"≥ {TARGET_FLOOR_SHARE:.0%}" if level == "c64" else ""
            t.add(
                name,
                "requests/s, gateway / floor",
                f"{r['floor']['rps_median']:,.0f}",
                f"{g['rps_median']:,.0f}",
                "",
                f"{share:.0%}",
                goal,
                share >= TARGET_FLOOR_SHARE if goal else None,
            )


def _body_rows(t: Table, r: dict[str, Any]) -> None:
    name = "3 Claude Code-sized bodies"
    p = r["total_p50_us"]
    kb = r["big_body_bytes"] / 1024
    t.add(
        name,
        "total p50, small body",
        us(p["direct_small"]),
        us(p["gateway_small"]),
        signed_us(r["added_p50_small_us"]),
    )
    t.add(
        name,
        f"total p50, {kb:.0f} KB body",
        us(p["direct_big"]),
        us(p["gateway_big"]),
        signed_us(r["added_p50_big_us"]),
    )
    added = r["added_by_body_size_us"]
    t.add(
        name,
        "gateway's added p50: big minus small body",
        diff=signed_us(added),
        target=f"≤ +{us(TARGET_BODY_ADDED_US)}",
        ok=added <= TARGET_BODY_ADDED_US,
    )


def _stream_rows(t: Table, s: dict[str, Any]) -> None:
    for key, r in s.items():
        if "@" not in key:
            continue
        d, g = r["direct"], r["gateway"]
        name = f"4 {r['streams']:,} streams, an event / {r['interval_ms']} ms each"
        big = r["streams"] >= 5000  # the targets are stated for 5,000 streams
        rss = g["gateway_rss_per_stream_kb"]
        t.add(
            name,
            "gateway RSS per open stream",
            gateway=f"{rss:.1f} KB",
            target=f"≤ {TARGET_RSS_PER_STREAM_KB:.0f} KB" if big else "",
            ok=rss <= TARGET_RSS_PER_STREAM_KB if big else None,
        )
        for q in ("p50", "p99"):
            a, b = d["delay_us"][q], g["delay_us"][q]
            goal = q == "p99" and big
            t.add(
                name,
                f"delivery delay {q}",
                us(a),
                us(b),
                signed_us(b - a),
                target=f"≤ +{us(TARGET_DELAY_ADDED_P99_US)}" if goal else "",
                ok=b - a <= TARGET_DELAY_ADDED_P99_US if goal else None,
            )
        a, b = d["gap_us"]["p99"], g["gap_us"]["p99"]
        t.add(name, "inter-event gap p99", us(a), us(b), signed_us(b - a))
        t.add(
            name,
            "events/s received; errors",
            f"{d['events_per_s']:,.0f}; {d['errors']}",
            f"{g['events_per_s']:,.0f}; {g['errors']}",
        )
        cpu = f"{g['gateway_cpu_percent']:.0f}% ({g['gateway_cpu_system_percent']:.0f}% in the kernel)"
        t.add(name, "gateway CPU (one core = 100%)", gateway=cpu)


def _scaling_rows(t: Table, r: dict[str, Any]) -> None:
    one = r["1"]["rps_median"]
    for n, x in r.items():
        if not n.isdigit():
            continue
        k = int(n)
        eff = x["rps_median"] / (k * one) if one else float("nan")
        note = "" if x["cores_free"] else " (shares cores with upstream + wrk)"
        t.add(
            "5 scaling, --workers N",
            f"N={n} requests/s{note}",
            gateway=f"{x['rps_median']:,.0f}",
            times=f"{eff:.2f} of linear" if k > 1 else "",
            target=f"≥ {TARGET_SCALING:.1f} × N × N=1" if k > 1 else "",
            ok=eff >= TARGET_SCALING if k > 1 and x["cores_free"] else None,
        )


TARGET_TEAM_COST = 0.05  # members + usage recording: at most 5% of requests/s


def _team_rows(t: Table, r: dict[str, Any]) -> None:
    off, member = r["team_off"]["rps_median"], r["team_member"]["rps_median"]
    cost = 1 - member / off if off else float("nan")
    t.add(
        "6 team, 64 conns",
        "requests/s: no member, recording off → member key, usage recorded",
        f"{off:,.0f}",
        f"{member:,.0f}",
        f"{-cost * 100:+.1f}%",
        ratio(member, off),
        f"cost ≤ {TARGET_TEAM_COST * 100:.0f}%",
        cost <= TARGET_TEAM_COST,
    )
    cpu_off, cpu_member = r["team_off"]["cpu_us_per_request"], r["team_member"]["cpu_us_per_request"]
    answered = r["team_member"]["requests"] - r["team_member"]["errors"]
    t.add(
        "6 team, 64 conns",
        "gateway CPU per request (all its threads)",
        us(cpu_off),
        us(cpu_member),
        signed_us(cpu_member - cpu_off),
        ratio(cpu_member, cpu_off),
    )
    t.add(
        "6 team, 64 conns",
        "usage rows written / requests answered (member run)",
        gateway=f"{r['usage_rows_written']:,} / {answered:,}",
    )


TARGET_REDIS_COST = 0.15  # limits counted in Redis: at most 15% of requests/s vs no limits


def _redis_rows(t: Table, r: dict[str, Any]) -> None:
    if "skipped" in r:
        t.add("7 redis limits", f"skipped: {r['skipped']}")
        return
    none, local, shared = (r[k]["rps_median"] for k in ("limits_none", "limits_local", "limits_redis"))
    cost = 1 - shared / none if none else float("nan")
    t.add(
        "7 redis limits, 64 conns",
        "requests/s: member without limits → limits counted in Redis",
        f"{none:,.0f}",
        f"{shared:,.0f}",
        f"{-cost * 100:+.1f}%",
        ratio(shared, none),
        f"cost ≤ {TARGET_REDIS_COST * 100:.0f}%",
        cost <= TARGET_REDIS_COST,
    )
    t.add(
        "7 redis limits, 64 conns",
        "requests/s: limits counted in the process → in Redis",
        f"{local:,.0f}",
        f"{shared:,.0f}",
        f"{(shared / local - 1) * 100:+.1f}%" if local else "",
        ratio(shared, local),
    )
    cpu_none, cpu_shared = r["limits_none"]["cpu_us_per_request"], r["limits_redis"]["cpu_us_per_request"]
    t.add(
        "7 redis limits, 64 conns",
        "gateway CPU per request (all its threads)",
        us(cpu_none),
        us(cpu_shared),
        signed_us(cpu_shared - cpu_none),
        ratio(cpu_shared, cpu_none),
    )
    t.add(
        "7 redis limits, 64 conns",
        "Redis calls per request (EVALSHA = 1) / redis-server CPU per request",
        gateway=f"{r['redis_calls_per_request']:.2f} / {us(r['redis_cpu_us_per_request'])}",
    )


def rows(results: dict[str, Any]) -> list[Row]:
    t = Table()
    s = results["scenarios"]
    ref = results.get("baseline_ref") or "baseline"
    if "latency" in s:
        _latency_rows(t, s["latency"], ref)
    if "throughput" in s:
        _throughput_rows(t, s["throughput"], ref)
    if "big_bodies" in s:
        _body_rows(t, s["big_bodies"])
    if "long_streams" in s:
        _stream_rows(t, s["long_streams"])
    if "scaling" in s:
        _scaling_rows(t, s["scaling"])
    if "team" in s:
        _team_rows(t, s["team"])
    if "redis" in s:
        _redis_rows(t, s["redis"])
    return t.rows


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"### ccx-proxy bench ({'quick' if results['quick'] else 'full'} run, {m['date']})",
        "",
        f"{m['cpus_online']} cores ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']}, "
        f"aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, load generator: {m['loadgen']}; "
        f"pinning: gateway on CPU {m['gateway_cpus']}, upstream + load generator on CPU {m['load_cpus']}.",
        "",
        "| scenario | figure | direct | gateway | gateway − direct | gateway / direct | target | |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> str:
    """Latency percentiles, direct vs gateway (vs the naive forwarder); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install '.[bench]')"
    r = results["scenarios"].get("latency")
    if r is None:
        return "no latency scenario: no PNG"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in (
        (axes[0], "ttfb_curve_us", "time to first byte"),
        (axes[1], "total_curve_us", "total"),
    ):
        ref = results.get("baseline_ref") or "baseline"
        for name, style, label in (
            ("direct", "o-", "direct"),
            ("gateway", "s-", "gateway"),
            ("gateway_1core", "s:", "gateway on the client's core"),
            ("baseline", "x-.", f"gateway as of {ref}"),
            ("naive", "^--", "naive aiohttp forwarder"),
            ("floor", "d:", "aiohttp handler, no upstream"),
        ):
            if name not in r:
                continue
            curve = r[name][kind]
            qs = [float(q) for q in curve]
            # x: "nines" so the tail gets room: -log10(1 - q/100)
            xs = [-math.log10(1 - q / 100) for q in qs]
            ax.plot(xs, list(curve.values()), style, label=label, markersize=4)
        ticks = [50, 90, 99, 99.9]
        ax.set_xticks([-math.log10(1 - t / 100) for t in ticks], [f"p{t:g}" for t in ticks])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylabel("µs")
        ax.set_title(f"one client, ~6 KB SSE: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def save(results: dict[str, Any], out_dir: Path) -> tuple[str, list[Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench-quick" if results["quick"] else "bench"
    table = markdown(results)
    md, js, png = out_dir / f"{stem}.md", out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    md.write_text(table)
    js.write_text(json.dumps(results, indent=1, default=str))
    note = plot(results, png)
    return table + "\n" + note + "\n", [md, js] + ([png] if png.exists() else [])
