"""The bench harness (quick mode) and ``ccx-proxy bench --direct --via``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccx_proxy import benchmark, cli
from ccx_proxy.benchmark import percentile
from ccx_proxy.mock_upstream import MockUpstream

from .conftest import ACCESS_KEY, UPSTREAM_KEY, channel

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) != percentile([], 50)  # NaN


@pytest.mark.timeout(90)
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="the harness pins CPUs: Linux")
def test_bench_quick_mode_produces_every_figure(tmp_path: Path) -> None:
    """make bench-quick: every scenario runs end to end (speed is not checked)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--no-install", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "bench-quick.md").read_text()
    assert "| 1 latency, 1 client | TTFB p50 |" in table and table in result.stdout
    data = json.loads((tmp_path / "bench-quick.json").read_text())
    assert {"python", "aiohttp", "uvloop", "cpus_online", "loadgen"} <= set(data["machine"])
    s = data["scenarios"]
    assert set(s) == {"latency", "throughput", "big_bodies", "long_streams", "scaling", "team", "redis"}
    redis = s["redis"]
    assert "skipped" not in redis or os.environ.get("CCX_REQUIRE_SERVICES") != "1", redis
    if "skipped" not in redis:
        for target in ("limits_none", "limits_local", "limits_redis"):
            assert redis[target]["errors"] == 0 and redis[target]["requests"] > 0
        assert 1.5 <= redis["redis_calls_per_request"] <= 3  # admit + finish, a few background calls
    team = s["team"]
    assert team["team_off"]["errors"] == 0 and team["team_member"]["errors"] == 0
    member = team["team_member"]
    assert member["requests"] > 0 and team["usage_rows_written"] >= member["requests"]
    for target in ("direct", "gateway"):
        assert s["latency"][target]["errors"] == 0 and s["latency"][target]["ttfb_us"]["n"] == 30
        assert (
            s["throughput"]["c32"][target]["errors"] == 0 and s["throughput"]["c32"][target]["rps_median"] > 0
        )
        streams = s["long_streams"]["20@50"][target]
        assert streams["errors"] == 0 and streams["flowing"] == 20 and streams["events"] > 0
    # The gateway relays the upstream's bytes: same body size through both paths (minus nothing).
    assert s["latency"]["gateway"]["body_bytes"] > 6000
    assert s["big_bodies"]["errors"] == 0 and s["big_bodies"]["big_body_bytes"] > 100_000
    assert s["scaling"]["1"]["errors"] == 0 and s["scaling"]["2"]["errors"] == 0
    assert s["scaling"]["2"]["rps_median"] > 0


@pytest.fixture
async def mock_and_gateway(aiohttp_server: Any, start_gateway: Any) -> tuple[str, str]:
    upstream = await aiohttp_server(MockUpstream(UPSTREAM_KEY).app())
    mock_url = str(upstream.make_url("")).rstrip("/")
    gateway = await start_gateway(channel("mock", mock_url))
    return mock_url, str(gateway.make_url("")).rstrip("/")


async def test_cli_bench_compares_direct_and_via_gateway(
    mock_and_gateway: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    direct, via = mock_and_gateway
    out_json = tmp_path / "bench.json"
    argv = ["bench", "--direct", direct, "--via", via, "--key", UPSTREAM_KEY, "--via-key", ACCESS_KEY]
    out_png = tmp_path / "bench.png"
    argv += ["-n", "6", "--json", str(out_json), "--png", str(out_png)]
    code = await asyncio.to_thread(cli.main, argv)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "6 requests each way, alternating" in printed
    # The line to run it again: the same options, never a key.
    again = f"  again:  ccx-proxy bench --direct {direct} --via {via} --model claude-sonnet-4-5 -n 6"
    assert again in printed and UPSTREAM_KEY not in printed and ACCESS_KEY not in printed
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"chart: {out_png}" in printed
    assert "TTFB p50" in printed and "total p99" in printed and "paired median overhead" in printed
    data = json.loads(out_json.read_text())
    for side in ("direct", "via"):
        assert data[side]["errors"] == []
        assert 0 < data[side]["ttfb_ms"]["p50"] <= data[side]["total_ms"]["p99"]
    assert data["via"]["url"] == via + "/v1/messages"


async def test_cli_bench_reports_a_failing_side(
    mock_and_gateway: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    direct, via = mock_and_gateway
    argv = ["bench", "--direct", direct, "--via", via, "--key", UPSTREAM_KEY, "--via-key", "wrong", "-n", "2"]
    code = await asyncio.to_thread(cli.main, argv)
    printed = capsys.readouterr().out
    assert code == 1
    assert "via: 2 failed request(s), first: HTTP 401" in printed
    assert UPSTREAM_KEY not in printed


def test_cli_bench_png_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(benchmark, "_have_matplotlib", lambda: False)
    argv = ["bench", "--direct", "http://127.0.0.1:1", "--via", "http://127.0.0.1:1", "--key", "k"]
    assert cli.main([*argv, "--png", "x.png"]) == 2
    assert "--png needs matplotlib: pip install 'ccx-proxy[bench]'" in capsys.readouterr().err


def test_cli_bench_help_shows_the_demo_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "  " + benchmark.DEMO_COMMAND + "\n" in capsys.readouterr().out
