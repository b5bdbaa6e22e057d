"""``ccx-proxy bench``: the same Messages request, direct to an upstream and through a
gateway, alternating, with time-to-first-byte and total-time percentiles side by side.

Alternating (direct, via, via, direct, ...) means drift in the upstream's speed
hits both columns alike; the paired median (via minus direct in the same round)
is the steadiest figure for what the gateway adds.  With a real LLM upstream the
spread of generation times is far larger than any gateway overhead, so use
enough requests (``-n``) and read the paired figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from .upstream.wire import endpoints

PERCENTILES = (50, 90, 99)
NAN = float("nan")
# The demo, as `make run` starts it (gateway :3000, mock upstream :3001): paste as it is.
DEMO_COMMAND = (
    "ccx-proxy bench --direct http://127.0.0.1:3001 --via http://127.0.0.1:3000 "
    '--key mock-upstream-key --via-key "$PROXY_ACCESS_KEY" -n 200'
)
EPILOG = (
    "Against the demo (make run; export the PROXY_ACCESS_KEY it prints), paste:\n"
    f"  {DEMO_COMMAND}\n"
    "Keys come from the options or the environment and are never printed."
)


@dataclass
class Side:
    """One column: a URL, its headers, and what came back."""

    name: str
    url: str
    headers: dict[str, str]
    ttfb_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    model: str
    requests: int
    stream: bool
    direct: Side
    via: Side
    paired_ttfb_ms: list[float]
    paired_total_ms: list[float]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "requests": self.requests, "stream": self.stream}
        for side in (self.direct, self.via):
            out[side.name] = {
                "url": side.url,
                "ttfb_ms": percentiles(side.ttfb_ms),
                "total_ms": percentiles(side.total_ms),
                "errors": side.errors,
            }
        out["overhead_paired_median_ms"] = {
            "ttfb": _median(self.paired_ttfb_ms),
            "total": _median(self.paired_total_ms),
        }
        return out


DEFAULT_PROMPT = "Reply with one short sentence."


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in PERCENTILES}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def request_body(model: str, prompt: str, max_tokens: int, stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "max_tokens": max_tokens,
            "stream": stream,
            "messages": [{"role": "user", "content": prompt}],
        }
    )


def key_headers(key: str, bearer: bool) -> dict[str, str]:
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    if bearer:
        headers["authorization"] = f"Bearer {key}"
    else:
        headers["x-api-key"] = key
    return headers


async def _one(session: aiohttp.ClientSession, side: Side, body: bytes, record: bool) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    async with session.post(side.url, data=body, headers=side.headers) as response:
        if response.status != 200:
            text = (await response.read())[:300].decode("utf-8", "replace")
            if record:
                side.errors.append(f"HTTP {response.status}: {text}")
            return NAN, NAN
        async for chunk in response.content.iter_any():
            if not first and chunk:
                first = time.perf_counter()
        done = time.perf_counter()
    ttfb, total = ((first or done) - started) * 1000, (done - started) * 1000
    if record:
        side.ttfb_ms.append(ttfb)
        side.total_ms.append(total)
    return ttfb, total


async def run(
    direct: Side, via: Side, body: bytes, requests: int, warmup: int = 1, timeout: float = 600.0
) -> tuple[list[float], list[float]]:
    """Alternate the two sides; returns the paired (via - direct) TTFB and total differences."""
    paired_ttfb: list[float] = []
    paired_total: list[float] = []
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    # One session per side: each keeps its own warm connection, as a real client would.
    async with (
        aiohttp.ClientSession(timeout=client_timeout, auto_decompress=False) as s_direct,
        aiohttp.ClientSession(timeout=client_timeout, auto_decompress=False) as s_via,
    ):
        sessions = {direct.name: s_direct, via.name: s_via}
        for i in range(warmup + requests):
            record = i >= warmup
            order = (direct, via) if i % 2 == 0 else (via, direct)
            timings = {}
            for side in order:
                try:
                    timings[side.name] = await _one(sessions[side.name], side, body, record)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    if record:
                        side.errors.append(f"{type(exc).__name__}: {exc}")
                    timings[side.name] = (NAN, NAN)
            (dt, dn), (vt, vn) = timings[direct.name], timings[via.name]
            if record and dt == dt and vt == vt:
                paired_ttfb.append(vt - dt)
                paired_total.append(vn - dn)
    return paired_ttfb, paired_total


async def compare(
    direct_url: str,
    via_url: str,
    *,
    model: str,
    requests: int,
    direct_key: str,
    via_key: str,
    bearer: bool = False,
    prompt: str = "Reply with one short sentence.",
    max_tokens: int = 64,
    stream: bool = True,
    warmup: int = 1,
) -> BenchResult:
    direct = Side("direct", endpoints(direct_url).messages.url, key_headers(direct_key, bearer))
    via = Side("via", endpoints(via_url).messages.url, key_headers(via_key, False))
    body = request_body(model, prompt, max_tokens, stream)
    paired_ttfb, paired_total = await run(direct, via, body, requests, warmup)
    return BenchResult(model, requests, stream, direct, via, paired_ttfb, paired_total)


def _ms(value: float) -> str:
    return "—" if value != value else f"{value:.2f} ms"


def _signed(value: float) -> str:
    return "—" if value != value else f"{value:+.2f} ms"


def reproduce(args: argparse.Namespace) -> str:
    """The command line that repeats this run, keys left to the environment."""
    parts = ["ccx-proxy bench", "--direct", args.direct, "--via", args.via, "--model", args.model]
    parts += ["-n", str(args.n), "--max-tokens", str(args.max_tokens), "--warmup", str(args.warmup)]
    parts += ["--bearer"] if args.bearer else []
    parts += ["--no-stream"] if args.no_stream else []
    if args.prompt != DEFAULT_PROMPT:
        parts += ["--prompt", json.dumps(args.prompt)]
    return " ".join(parts)


def render(result: BenchResult, command: str = "") -> str:
    d, v = result.direct, result.via
    lines = [
        f"ccx-proxy bench: {result.requests} requests each way, alternating; model {result.model}"
        f"{', streaming' if result.stream else ''}",
        f"  direct: {d.url}",
        f"  via:    {v.url}",
    ]
    if command:
        lines.append(f"  again:  {command}  (keys: --key/ANTHROPIC_API_KEY, --via-key/PROXY_ACCESS_KEY)")
    lines += [
        "",
        f"{'':12}{'direct':>12}{'via gateway':>14}{'overhead':>12}{'ratio':>8}",
    ]
    for label, key in (("TTFB", "ttfb_ms"), ("total", "total_ms")):
        for q in PERCENTILES:
            a, b = percentile(getattr(d, key), q), percentile(getattr(v, key), q)
            ratio = f"{b / a:.2f}×" if a and a == a and b == b else "—"
            lines.append(f"{label + f' p{q}':12}{_ms(a):>12}{_ms(b):>14}{_signed(b - a):>12}{ratio:>8}")
    lines.append("")
    lines.append(
        f"paired median overhead (via − direct, same round): TTFB {_signed(_median(result.paired_ttfb_ms))}, "
        f"total {_signed(_median(result.paired_total_ms))}"
    )
    for side in (d, v):
        if side.errors:
            lines.append(f"{side.name}: {len(side.errors)} failed request(s), first: {side.errors[0]}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--direct", required=True, help="the upstream's base URL, as a channel's baseUrl")
    parser.add_argument("--via", required=True, help="the gateway's root URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--model", default="claude-sonnet-4-5", help="model name sent both ways")
    parser.add_argument("-n", type=int, default=20, help="requests each way (default 20)")
    parser.add_argument("--key", help="the upstream's API key for --direct (env ANTHROPIC_API_KEY)")
    parser.add_argument("--via-key", help="the gateway's access key (env PROXY_ACCESS_KEY, else --key)")
    parser.add_argument("--bearer", action="store_true", help="send --key as Authorization: Bearer")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted requests each way first (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument(
        "--png", metavar="PATH", help="also draw the percentiles to PATH (matplotlib: the 'bench' extra)"
    )


def main(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand."""
    direct_key = args.key or os.environ.get("ANTHROPIC_API_KEY", "")
    via_key = args.via_key or os.environ.get("PROXY_ACCESS_KEY", "") or direct_key
    if not direct_key:
        print("ccx-proxy bench: --key (or ANTHROPIC_API_KEY) is needed for --direct", file=sys.stderr)
        return 2
    if args.n < 1:
        print("ccx-proxy bench: -n must be at least 1", file=sys.stderr)
        return 2
    if args.png and not _have_matplotlib():
        print(
            "ccx-proxy bench: --png needs matplotlib: pip install 'ccx-proxy[bench]' (or drop --png)",
            file=sys.stderr,
        )
        return 2
    result = asyncio.run(
        compare(
            args.direct,
            args.via,
            model=args.model,
            requests=args.n,
            direct_key=direct_key,
            via_key=via_key,
            bearer=args.bearer,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            stream=not args.no_stream,
            warmup=args.warmup,
        )
    )
    print(render(result, reproduce(args)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    if args.png:
        draw(result, args.png, reproduce(args))
        print(f"chart: {args.png}", flush=True)
    return 0 if result.direct.ttfb_ms and result.via.ttfb_ms else 1


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(result: BenchResult, path: str, command: str) -> None:
    """TTFB and total-time percentiles, direct vs via, as grouped bars in a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.38
    panels = (("time to first byte", "ttfb_ms"), ("total time", "total_ms"))
    for ax, (label, key) in zip(axes, panels, strict=True):
        xs = range(len(PERCENTILES))
        for offset, side in ((-width / 2, result.direct), (width / 2, result.via)):
            values = [percentile(getattr(side, key), q) for q in PERCENTILES]
            bars = ax.bar([x + offset for x in xs], values, width, label=side.name)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs), [f"p{q}" for q in PERCENTILES])
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.legend()
    figure.suptitle(
        f"{result.requests} requests each way, alternating; model {result.model}\n{command}", fontsize=8
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
