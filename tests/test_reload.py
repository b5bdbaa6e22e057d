"""Hot reload: file changes and SIGHUP apply within ~1 s, invalid files are
rejected, in-flight streams finish on their snapshot, nothing is dropped."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ccx_proxy.app import WATCHER, create_app
from ccx_proxy.config import load_config
from ccx_proxy.state import GATEWAY
from tests.conftest import AUTH, SSE_BODY, Reply, make_settings, message_body, unused_port

FIRST_EVENT = SSE_BODY.index(b"\n\n") + 2  # the gateway waits for the first whole event


def _write(path: Path, channels: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"channels": channels}))
    os.replace(tmp, path)


def _ch(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "baseUrl": url, "apiKeys": ["k"], **extra}


@pytest.fixture
async def setup(tmp_path: Path, aiohttp_client: Any, make_upstream: Any) -> Any:
    a, b = await make_upstream(), await make_upstream()
    path = tmp_path / "channels.json"
    _write(path, [_ch("a", a.url)])
    settings = make_settings(channels_file=str(path), watch_interval=0.1)
    client = await aiohttp_client(
        create_app(settings, load_config(path, env={})), server_kwargs={"handler_cancellation": True}
    )
    return client, path, a, b


async def _served_by(client: Any) -> str:
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    await resp.read()
    return resp.headers.get("x-ccx-channel", f"status {resp.status}")


async def _eventually(check: Any, within: float = 2.0) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, "not applied in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_an_edited_file_applies_within_a_second(setup: Any) -> None:
    client, path, a, b = setup
    assert await _served_by(client) == "a"
    _write(path, [_ch("b", b.url)])

    async def switched() -> bool:
        return await _served_by(client) == "b"

    took = await _eventually(switched)
    assert took < 1.0


async def test_an_invalid_file_is_rejected_and_the_running_config_stays(setup: Any, caplog: Any) -> None:
    client, path, a, b = setup
    watcher = client.server.app[WATCHER]
    path.write_text('{"channels": [{"name": "x", "baseUrl": "ftp://nope"}]}')

    def rejected(n: int) -> Any:
        async def check() -> bool:
            return watcher.rejected == n

        return check

    await _eventually(rejected(1))  # the watcher has read the bad file ...
    assert await _served_by(client) == "a"  # ... and kept the running configuration
    assert "reload (file changed) rejected: channels[0].baseUrl" in caplog.text
    assert "keeping the running configuration" in caplog.text
    path.write_text("{broken")
    await _eventually(rejected(2))
    assert await _served_by(client) == "a" and watcher.reloads == 0


async def test_in_flight_streams_finish_on_the_config_they_started_with(setup: Any) -> None:
    client, path, a, b = setup
    release = asyncio.Event()

    async def gate(i: int) -> None:
        await release.wait()

    a.reply = Reply(chunks=[SSE_BODY[:FIRST_EVENT], SSE_BODY[FIRST_EVENT:]], gate=gate)
    resp = await client.post("/v1/messages", data=message_body(), headers=AUTH)
    first = await resp.content.readany()
    a.reply = Reply()  # later requests to a are not held
    _write(path, [_ch("b", b.url)])  # a is gone from the new configuration

    async def switched() -> bool:
        return await _served_by(client) == "b"

    await _eventually(switched)
    release.set()
    rest = await resp.read()
    assert first + rest == SSE_BODY and resp.headers["x-ccx-channel"] == "a"


async def test_reload_under_load_drops_nothing(setup: Any) -> None:
    client, path, a, b = setup
    a.reply = b.reply = Reply(chunks=[SSE_BODY[:30], SSE_BODY[30:80], SSE_BODY[80:]], delay=0.005)
    url = str(client.make_url("/v1/messages"))
    stop = time.monotonic() + 2.0
    results: list[tuple[int, bool]] = []
    reloads = 0

    async def load(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            async with session.post(url, data=message_body(), headers=AUTH) as resp:
                results.append((resp.status, await resp.read() == SSE_BODY))

    async def flip() -> None:
        nonlocal reloads
        i = 0
        while time.monotonic() < stop:
            up = (a, b)[i % 2]
            _write(path, [_ch("a" if up is a else "b", up.url)])
            i += 1
            await asyncio.sleep(0.15)
        reloads = i

    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(asyncio.gather(flip(), *(load(session) for _ in range(16))), 30)
    watcher = client.server.app[WATCHER]
    assert reloads >= 8 and watcher.reloads >= 5
    assert len(results) > 100
    assert all(status == 200 and exact for status, exact in results), results[:5]


def test_sighup_reloads_a_running_server(tmp_path: Path) -> None:

    port, mock_port = unused_port(), unused_port()
    path = tmp_path / "channels.json"
    mock = f"http://127.0.0.1:{mock_port}"
    _write(path, [_ch("first", mock, apiKeys=["mock-upstream-key"])])
    env = {**os.environ, "PROXY_ACCESS_KEY": "k", "CONFIG_WATCH_INTERVAL_MS": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ccx_proxy",
            "serve",
            "--port",
            str(port),
            "--config",
            str(path),
            "--with-mock-upstream",
            "--mock-port",
            str(mock_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for _ in range(4):
            proc.stdout.readline()

        def served_by() -> str:
            import urllib.request

            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/messages",
                data=message_body(stream=False),
                headers={"x-api-key": "k", "content-type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                return str(resp.headers["x-ccx-channel"])

        assert served_by() == "first"
        _write(path, [_ch("second", mock, apiKeys=["mock-upstream-key"])])
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 3
        while served_by() != "second":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert "reloaded" in stderr and "(SIGHUP)" in stderr
    assert "(file changed)" not in stderr  # CONFIG_WATCH_INTERVAL_MS=0: only the signal reloads


async def test_reload_reenables_keys_disabled_for_auth(setup: Any) -> None:
    client, path, a, b = setup
    gateway = client.server.app[GATEWAY]
    health = gateway.health.channel("a", gateway.runtime.config.channels[0].breaker)
    health.key("k", gateway.runtime.config.channels[0].breaker).disabled = True
    assert (await client.post("/v1/messages", data=message_body(), headers=AUTH)).status == 502
    _write(path, [_ch("a", a.url, priority=5)])

    async def back() -> bool:
        return await _served_by(client) == "a"

    await _eventually(back)
