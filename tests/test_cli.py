"""The ``ccx-proxy`` command, run as a real process."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from ccx_proxy import cli
from ccx_proxy.cli import follow_mock_port, main
from ccx_proxy.config import parse_config
from tests.conftest import unused_port

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_ACCESS_KEY", "CHANNELS_FILE", "PORT")}
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ccx_proxy", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=REPO,
        timeout=30,
    )


def test_serve_refuses_to_start_without_an_access_key() -> None:
    result = _run("serve")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PROXY_ACCESS_KEY is not set" in lines[0]


def test_check_config_summarises_with_masked_keys(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps(
            {
                "channels": [
                    {"name": "a", "baseUrl": "https://a.example", "apiKeys": ["sk-literal-secret-abcd"]},
                    {
                        "name": "b",
                        "baseUrl": "https://b.example",
                        "apiKeys": ["${B_KEY}"],
                        "status": "disabled",
                    },
                ]
            }
        )
    )
    result = _run("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("a [active]") and "sk-…abcd" in lines[0]
    assert "sk-literal-secret" not in result.stdout
    assert lines[1].startswith("b [disabled]") and "${B_KEY}" in lines[1]
    assert lines[2].endswith("OK, 1 active of 2 channels")


def test_check_config_reports_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    path.write_text(
        json.dumps(
            {
                "channels": [
                    {"name": "ok", "baseUrl": "https://a.example", "apiKeys": ["k"]},
                    {
                        "name": "bad",
                        "baseUrl": "ftp://b",
                        "apiKeys": ["${UNSET_VAR_XYZ}"],
                        "status": "sleepy",
                    },
                ]
            }
        )
    )
    result = _run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "channels[1].status: must be one of active, suspended, disabled (got 'sleepy')",
        "channels[1].baseUrl: not an http(s) URL: 'ftp://b'",
    ]


def test_check_config_uses_channels_file_env(tmp_path: Path) -> None:
    result = _run("check-config", CHANNELS_FILE=str(tmp_path / "none.json"))
    assert result.returncode == 1 and "file not found" in result.stderr


def test_version_and_module_entry_point() -> None:
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.startswith("ccx-proxy ")
    with pytest.raises(SystemExit):
        main(["--help"])


async def test_serve_with_mock_upstream_moves_the_shipped_demo_channel_to_mock_port() -> None:
    # The shipped channels.json as it is: its demo channel says 127.0.0.1:3001.
    port, mock_port = unused_port(), unused_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ccx_proxy",
            "serve",
            "--with-mock-upstream",
            "--mock-port",
            str(mock_port),
            "--port",
            str(port),
            "--config",
            str(REPO / "channels.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(PROXY_ACCESS_KEY="cli-key"),
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(4)]
        assert banner[2].strip() == 'export ANTHROPIC_API_KEY="cli-key"'
        assert banner[3].strip() == f'export ANTHROPIC_BASE_URL="http://127.0.0.1:{port}"'
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/messages",
                headers={"x-api-key": "cli-key"},
                json={
                    "model": "claude-opus-4-1",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hey"}],
                },
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["model"] == "mock-opus"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert (
        f"channel demo-mock now uses http://127.0.0.1:{mock_port} instead of http://127.0.0.1:3001" in stderr
    )
    assert "cli-key" not in stderr and "mock-upstream-key" not in stderr  # no secret in the log


def test_follow_mock_port_moves_only_channels_on_the_default_mock_address() -> None:
    config = parse_config(
        {
            "channels": [
                {"name": "demo", "baseUrl": "http://127.0.0.1:3001#", "apiKeys": ["k"]},
                {"name": "local", "baseUrl": "http://localhost:3002", "apiKeys": ["k"]},
                {
                    "name": "far",
                    "baseUrl": "https://a.example:3001",
                    "baseUrls": ["http://localhost:3001/x"],
                    "apiKeys": ["k"],
                },
            ]
        },
        {},
    )
    moved = follow_mock_port(config, 4555)
    assert [c.base_url for c in moved.channels] == [
        "http://127.0.0.1:4555#",
        "http://localhost:3002",
        "https://a.example:3001",
    ]
    assert moved.channels[2].base_urls == ("http://localhost:4555/x",)
    assert moved.channels[0].urls.messages.origin.port == 4555
    assert follow_mock_port(config, 3001) == config


def _busy_port() -> tuple[socket.socket, int]:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return busy, busy.getsockname()[1]


def test_serve_reports_a_busy_port() -> None:
    busy, port = _busy_port()
    with busy:
        started = time.monotonic()
        result = _run("serve", "--port", str(port), PROXY_ACCESS_KEY="k")
        assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "with --port or PORT; another ccx-proxy may already be running there" in result.stderr


def test_serve_reports_a_busy_mock_port() -> None:
    busy, mock_port = _busy_port()
    with busy:
        args = ("serve", "--with-mock-upstream", "--port", str(unused_port()), "--mock-port", str(mock_port))
        result = _run(*args, PROXY_ACCESS_KEY="k")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mock_port}" in result.stderr
    assert "with --mock-port; another ccx-proxy may already be running there" in result.stderr


def test_help_states_defaults_and_env_without_markup() -> None:
    for command in ("", "serve", "check-config", "mock-upstream", "bench"):
        result = _run(*command.split(), "--help")
        assert result.returncode == 0, result.stderr
        assert "``" not in result.stdout and ":class:" not in result.stdout
    serve = _run("serve", "--help").stdout
    for text in ("env CHANNELS_FILE", "env BIND_HOST", "env PORT", "env WORKERS", "default 3001"):
        assert text in " ".join(serve.split())
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.dest)
                assert action.required or "default" in action.help or "env " in action.help, action.help


def test_a_reload_keeps_the_demo_channel_on_the_mock_port() -> None:
    from ccx_proxy.app import create_app
    from ccx_proxy.state import GATEWAY
    from tests.conftest import make_settings

    shipped = parse_config(
        {"channels": [{"name": "demo-mock", "baseUrl": "http://127.0.0.1:3001", "apiKeys": ["k"]}]}, {}
    )
    app = create_app(make_settings(), follow_mock_port(shipped, 4555))
    gateway = app[GATEWAY]
    gateway.adjust = lambda loaded: follow_mock_port(loaded, 4555)  # as serve sets it
    gateway.apply(shipped)  # a reload reads the file as written ...
    assert gateway.runtime.config.channels[0].base_url == "http://127.0.0.1:4555"  # ... and it still moves


def test_migrate_and_usage_export_are_commands(tmp_path: Path) -> None:
    """``migrate`` and ``usage export`` reach the team CLI from the real entry point; the
    report's own options stay beside the ``export`` verb."""
    data = tmp_path / "data"
    no_url = {"DATABASE_URL": ""}  # unset: SQLite in DATA_DIR, whatever the shell has
    first = _run("migrate", DATA_DIR=str(data), **no_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"migrated {data / 'ccx.db'}: schema version 0 -> 1\n"
    again = _run("migrate", DATA_DIR=str(data), **no_url)
    assert again.returncode == 0 and "up to date" in again.stdout
    report = _run("usage", "--by", "day,member", "--since", "7d", "--csv", DATA_DIR=str(data), **no_url)
    assert report.returncode == 0 and report.stdout.startswith("day,member,requests"), report.stderr
    helped = _run("usage", "export", "--help")
    assert helped.returncode == 0 and "one transaction" in helped.stdout and "--replace" in helped.stdout
    wrong = _run("migrate", DATABASE_URL="mysql://u:s3cret@h/db")
    assert wrong.returncode == 2 and "DATABASE_URL must be a postgresql:// URL" in wrong.stderr
    assert "s3cret" not in wrong.stderr
