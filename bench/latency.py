"""One client, one request at a time: time to first byte and total time, each
target in turn (direct, gateway, ...) so that drift and noise hit all alike."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from http1 import BlockingClient, Timing

from ccx_proxy.benchmark import percentile  # one nearest-rank rule for every figure


@dataclass
class Target:
    name: str
    port: int
    request: bytes
    host: str = "127.0.0.1"


@dataclass
class Samples:
    ttfb_us: list[float] = field(default_factory=list)
    total_us: list[float] = field(default_factory=list)
    errors: int = 0
    size: int = 0


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "p99.9": percentile(values, 99.9),
        "mean": statistics.fmean(values) if values else float("nan"),
        "n": len(values),
    }


def measure(targets: list[Target], rounds: int, warmup: int) -> dict[str, Samples]:
    """Round-robin over the targets, rotating who goes first in each round."""
    clients = {t.name: BlockingClient(t.host, t.port) for t in targets}
    results = {t.name: Samples() for t in targets}
    try:
        for i in range(warmup + rounds):
            shift = i % len(targets)
            for target in targets[shift:] + targets[:shift]:
                timing: Timing = clients[target.name].request(target.request)
                if i < warmup:
                    continue
                samples = results[target.name]
                if timing.status != 200:
                    samples.errors += 1
                    continue
                samples.ttfb_us.append(timing.ttfb_ns / 1000)
                samples.total_us.append(timing.total_ns / 1000)
                samples.size = timing.size
    finally:
        for client in clients.values():
            client.close()
    return results
