"""The ccx-proxy bench: the gateway vs the same upstream reached directly.

Every scenario runs the same load direct to a fast upstream and through the
gateway in one run, alternating, and reports both, their difference and ratio
(never a lone absolute number).  Processes are pinned where there are cores to
pin: the gateway on one CPU, the upstream and the load generator on the others.

    make bench          # full run, ~3-4 minutes: bench/results/bench.{md,json,png}
    make bench-quick    # ~10 s, checks only that the harness works (CI)
    .venv/bin/python bench/run.py [--quick] [--only latency,throughput,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import body_model  # noqa: E402
import loadgen  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402
from procs import Proc, free_port, python  # noqa: E402

ALL = ("latency", "throughput", "big_bodies", "long_streams", "scaling", "team", "redis")
REPO = Path(__file__).resolve().parent.parent
QUICK_NOTE = (
    "bench --quick: these figures are NOT measurements (a few requests per scenario, seconds in all); "
    "this run only checks that the harness works -- run `make bench` for numbers"
)
SMALL_BODY = orjson.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": "Say hello in forty small pieces."}],
    }
)


def machine(wrk: str | None, gw: list[int], load: list[int]) -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = "python fallback (wrk not found)"
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        wrk_version = (
            (out.stdout or out.stderr).splitlines()[0].split(" [")[0] if (out.stdout or out.stderr) else wrk
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("ccx-proxy", "aiohttp", "uvloop", "orjson", "multidict", "yarl")},
        "loadgen": wrk_version,
        "gateway_cpus": ",".join(map(str, gw)),
        "load_cpus": ",".join(map(str, load)),
        "git_commit": commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else ""),
    }


def _checkout(ref: str, tmp: Path) -> Path:
    """src/ of the repository as of ``ref``, extracted under tmp (no worktree left behind);
    a directory holding ccx_proxy/ (another checkout's src/) is used as it is."""
    if (Path(ref) / "ccx_proxy").is_dir():
        return Path(ref).resolve()
    dest = tmp / "baseline"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", ref, "src"], capture_output=True, cwd=REPO, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def _stream_runs(text: str) -> list[tuple[int, int]]:
    runs = []
    for item in text.split(","):
        count, _, interval = item.partition("@")
        runs.append((int(count), int(interval or 50)))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds; checks the harness, not speed")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the results go")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator, not wrk")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the gateway as of a git ref (HEAD, main, a commit) or from another src/ directory, "
        "in the latency and throughput scenarios",
    )
    parser.add_argument(
        "--streams",
        help="long-stream runs as COUNT@INTERVAL_MS, comma-separated (default 2000@50,5000@250; quick 20@50)",
    )
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(ALL)
    unknown = set(chosen) - set(ALL)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")

    cpus = sorted(os.sched_getaffinity(0))
    gw_cpus, load_cpus = (cpus[:1], cpus[1:]) if len(cpus) >= 2 else (cpus, cpus)
    wrk = None if args.python_load else loadgen.find_wrk(install=not (args.quick or args.no_install))
    if wrk is None and not args.quick and not args.python_load:
        print("bench: wrk is required for a full run (apt-get install wrk)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, load_cpus)  # this process is a client too (one-client latency)
    if args.quick:
        print(QUICK_NOTE, flush=True)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ccx-bench-") as tmp_name:
        tmp = Path(tmp_name)
        upstream_port = free_port()
        channel = {
            "name": "bench",
            "baseUrl": f"http://127.0.0.1:{upstream_port}",
            "apiKeys": [scenarios.UPSTREAM_KEY],
            "modelMapping": {"sonnet": "bench-sonnet", "opus": "bench-opus"},
        }
        (tmp / "channels.json").write_bytes(orjson.dumps({"channels": [channel]}))
        ctx = scenarios.Ctx(
            quick=args.quick,
            tmp=tmp,
            wrk=wrk,
            gw_cpus=gw_cpus,
            load_cpus=load_cpus,
            all_cpus=cpus,
            upstream_port=upstream_port,
            small=SMALL_BODY,
            big=body_model.claude_code_body(model_first=True),
            stream_runs=_stream_runs(args.streams) if args.streams else None,
        )
        results: dict[str, Any] = {
            "quick": args.quick,
            "baseline_ref": args.baseline or "",
            "machine": machine(wrk, gw_cpus, load_cpus),
            "scenarios": {},
        }
        try:
            argv = [python(), str(Path(__file__).parent / "fast_upstream.py"), "--port", str(upstream_port)]
            if len(cpus) > 4:  # enough upstream for many workers (scaling); one process up to ~60k req/s
                argv += ["--procs", str(len(cpus) // 4)]
            ctx.procs["upstream"] = Proc("upstream", argv, load_cpus, tmp, port=upstream_port)
            ctx.ports["direct"] = upstream_port
            ctx.start_gateway("gateway")
            if not args.quick and ("latency" in chosen or "throughput" in chosen):
                naive_port = free_port()
                argv = [python(), str(Path(__file__).parent / "naive_forwarder.py"), str(naive_port)]
                argv += [f"http://127.0.0.1:{upstream_port}", scenarios.UPSTREAM_KEY]
                ctx.procs["naive"] = Proc("naive", argv, gw_cpus, tmp, port=naive_port)
                ctx.ports["naive"] = naive_port
            if not args.quick and ("latency" in chosen or "throughput" in chosen):
                floor_port = free_port()
                argv = [python(), str(Path(__file__).parent / "aiohttp_floor.py"), str(floor_port)]
                ctx.procs["floor"] = Proc("floor", argv, gw_cpus, tmp, port=floor_port)
                ctx.ports["floor"] = floor_port
            if args.baseline:
                ctx.start_gateway("baseline", source=_checkout(args.baseline, tmp))
                ctx.baseline_ref = args.baseline
            if not args.quick and "latency" in chosen and load_cpus != gw_cpus:
                # The same gateway on the client's and upstream's core: a single client is
                # served one step at a time, so this shows the gateway's own work without
                # the cross-core wake-ups (expensive on VMs) of the pinned layout.
                ctx.start_gateway("gateway_1core", cpus=load_cpus)
            for name in chosen:
                t0 = time.monotonic()
                print(f"bench: {name} ...", flush=True)
                results["scenarios"][name] = getattr(scenarios, name)(ctx)
                results["scenarios"][name]["elapsed_s"] = round(time.monotonic() - t0, 1)
        finally:
            for name in list(ctx.procs):
                ctx.stop(name)
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        text, files = report.save(results, Path(args.out))
    print()
    print(text)
    if args.quick:
        print(QUICK_NOTE)
    print("results: " + ", ".join(str(f) for f in files))
    print(f"bench took {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
