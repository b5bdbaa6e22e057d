"""``serve --workers N``: several processes on one port (SO_REUSEPORT), run for real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ccx_proxy.mock_upstream import MockUpstream
from ccx_proxy.workers import WorkersError, worker_count

from .conftest import UPSTREAM_KEY, unused_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT and /proc: Linux")
KEY = "workers-test-key"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_ACCESS_KEY", "WORKERS", "PORT")}
    return {**env, "PROXY_ACCESS_KEY": KEY, **extra}


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def _wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.timeout(60)
async def test_two_workers_share_the_port_serve_and_stop_cleanly(aiohttp_server: Any, tmp_path: Path) -> None:
    upstream = await aiohttp_server(MockUpstream(UPSTREAM_KEY).app())
    config = tmp_path / "channels.json"
    channel = {"name": "mock", "baseUrl": str(upstream.make_url("")), "apiKeys": [UPSTREAM_KEY]}
    config.write_text(json.dumps({"channels": [channel]}))
    port = unused_port()
    argv = [sys.executable, "-m", "ccx_proxy", "serve", "--workers", "2", "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(LOG_LEVEL="INFO"),
    )
    workers: list[int] = []
    try:
        await _wait_port(port, proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the second worker may still be starting
            workers = _children(proc.pid)
            listening = _listening_inodes(port)
            if len(workers) == 2 and all(_socket_inodes(w) & listening for w in workers):
                break
            await asyncio.sleep(0.05)
        assert len(workers) == 2, workers
        # Each worker holds its own listening socket on the port: SO_REUSEPORT, not a shared one.
        held = [_socket_inodes(w) & _listening_inodes(port) for w in workers]
        assert all(held) and not held[0] & held[1], held
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hey"}],
        }
        # A new connection per request, so the kernel spreads them over the workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(12):
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/messages", headers={"x-api-key": KEY}, json=body
                ) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["type"] == "message"
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0, stderr
    assert stdout.count("listening on http://127.0.0.1") == 1  # one banner, not one per worker
    assert "2 workers" in stderr and KEY not in stderr
    assert not [w for w in workers if _alive(w)], "a worker outlived the supervisor"


@pytest.mark.timeout(60)
async def test_a_dying_worker_stops_the_others(tmp_path: Path) -> None:
    config = tmp_path / "channels.json"
    config.write_text(
        json.dumps({"channels": [{"name": "x", "baseUrl": "http://127.0.0.1:1", "apiKeys": ["k"]}]})
    )
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
        env=_env(),
    )
    try:
        await _wait_port(port, proc)
        deadline = time.monotonic() + 10
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "exited with status" in stderr and "stopping the others" in stderr
    assert not [w for w in workers if _alive(w)]


def test_workers_report_a_busy_port_once(tmp_path: Path) -> None:
    config = tmp_path / "channels.json"
    config.write_text(
        json.dumps({"channels": [{"name": "x", "baseUrl": "http://127.0.0.1:1", "apiKeys": ["k"]}]})
    )
    with socket.socket() as busy:  # an ordinary listener, without SO_REUSEPORT
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ccx_proxy",
                "serve",
                "--workers",
                "3",
                "--port",
                str(port),
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.count(f"cannot listen on 127.0.0.1:{port}") == 1


def test_workers_and_the_demo_mock_do_not_mix() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ccx_proxy", "serve", "--with-mock-upstream", "--port", "0"],
        capture_output=True,
        text=True,
        env=_env(WORKERS="2"),
        timeout=30,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2 and "use --workers 1" in result.stderr


def test_worker_count_option_env_and_limits() -> None:
    assert worker_count(None, {}) == 1
    assert worker_count(None, {"WORKERS": "3"}) == 3
    assert worker_count(2, {"WORKERS": "3"}) == 2  # the option wins
    for bad in ("two", "-1", "1.5"):
        with pytest.raises(WorkersError, match="WORKERS must be a whole number"):
            worker_count(None, {"WORKERS": bad})
    with pytest.raises(WorkersError, match="between 1 and 1024"):
        worker_count(0, {})
