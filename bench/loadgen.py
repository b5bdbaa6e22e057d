"""Closed-loop load: N connections, each sending the next request as soon as the
last response is complete, for a fixed time.

``wrk`` (C) does the real runs: a Python generator would be the bottleneck.
The quick mode falls back to a small asyncio generator when wrk is missing,
since it only checks that the harness works.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

from http1 import ResponseTracker, build_request
from latency import percentile
from procs import cpu_list, find_program

LUA = Path(__file__).resolve().parent / "wrk" / "post.lua"


def find_wrk(install: bool) -> str | None:
    """wrk's path; with install, apt-get it when missing (Debian/Ubuntu, as root)."""
    return find_program("wrk", "wrk", install)


def run_wrk(
    wrk: str,
    port: int,
    connections: int,
    seconds: float,
    body_file: Path,
    headers_file: Path,
    cpus: list[int] | None,
    threads: int = 1,
) -> dict[str, float]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}/v1/messages",
    ]
    if cpus and shutil.which("taskset"):
        argv = ["taskset", "-c", cpu_list(cpus), *argv]
    env = {
        "BENCH_BODY_FILE": str(body_file),
        "BENCH_HEADERS_FILE": str(headers_file),
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON ") :])
            return _finish(data)
    raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def _finish(data: dict[str, float]) -> dict[str, float]:
    errors = sum(v for k, v in data.items() if k.startswith("errors_"))
    data["errors"] = errors
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


async def _python_load(
    port: int, connections: int, seconds: float, request: bytes
) -> tuple[list[float], int, float]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    stop_at = loop.time() + seconds

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while loop.time() < stop_at:
                tracker = ResponseTracker()
                started = time.perf_counter()
                writer.write(request)
                while True:
                    data = await reader.read(262144)
                    if not data:
                        raise ConnectionError("the server closed the connection mid-response")
                    if tracker.feed(data):
                        break
                latencies.append((time.perf_counter() - started) * 1e6)
                if tracker.status != 200:
                    errors += 1
        finally:
            writer.close()
            await writer.wait_closed()

    started = loop.time()
    await asyncio.gather(*(one() for _ in range(connections)))
    return latencies, errors, loop.time() - started


def run_python(
    port: int, connections: int, seconds: float, body: bytes, headers: dict[str, str]
) -> dict[str, float]:
    request = build_request("/v1/messages", f"127.0.0.1:{port}", headers, body)
    latencies, errors, elapsed = asyncio.run(_python_load(port, connections, seconds, request))
    return _finish(
        {
            "requests": len(latencies),
            "duration_us": elapsed * 1e6,
            "errors_status": errors,
            "p50_us": percentile(latencies, 50),
            "p90_us": percentile(latencies, 90),
            "p99_us": percentile(latencies, 99),
            "mean_us": sum(latencies) / max(1, len(latencies)),
        }
    )
