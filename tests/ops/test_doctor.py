"""``ccx-proxy doctor``, run in-process through ``cli.main`` against real sockets: the
built-in mock upstream, hostile upstreams, a running gateway, a busy port."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from ccx_proxy import cli
from ccx_proxy.mock_upstream import DEFAULT_KEY, MockUpstream
from ccx_proxy.ops import doctor
from tests.conftest import ACCESS_KEY, GatewayFactory, unused_port

KEY = secrets.token_urlsafe(32)  # the gateway's PROXY_ACCESS_KEY in these tests
WRONG_UPSTREAM_KEY = "sk-wrong-upstream-key-5555qrst"
_CLEARED = (
    "PROXY_ACCESS_KEY",
    "EXTRA_PROXY_ACCESS_KEYS",
    "ADMIN_ACCESS_KEY",
    "CHANNELS_FILE",
    "DATA_DIR",
    "PORT",
    "BIND_HOST",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)


class Doctor:
    """Runs ``ccx-proxy doctor`` with a channels file, a data directory and a free port."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.port = unused_port()
        self.data_dir = str(tmp_path / "data")
        self.channels: list[dict[str, Any]] = []
        monkeypatch.setenv("PROXY_ACCESS_KEY", KEY)

    def demo(self, base_url: str, key: str = DEFAULT_KEY, **fields: Any) -> dict[str, Any]:
        channel = {
            "name": "demo-mock",
            "baseUrl": base_url,
            "apiKeys": [key],
            "modelMapping": {"haiku": "mock-haiku"},
            **fields,
        }
        self.channels.append(channel)
        return channel

    async def run(self, *args: str) -> tuple[int, str]:
        path = self.tmp_path / "channels.json"
        path.write_bytes(orjson.dumps({"channels": self.channels}))
        argv = ["doctor", "--config", str(path), "--data-dir", self.data_dir, "--port", str(self.port)]
        # In a thread: the doctor runs its own event loop; this one serves the upstreams.
        code = await asyncio.to_thread(cli.main, [*argv, *args])
        out = self.capsys.readouterr().out
        return code, out


@pytest.fixture
def run_doctor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> Doctor:
    return Doctor(tmp_path, monkeypatch, capsys)


@pytest.fixture
async def mock_url(aiohttp_server: Any) -> str:
    server = await aiohttp_server(MockUpstream().app())
    return str(server.make_url(""))


def lines(out: str, level: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(level + " ")]


def assert_no_secret(out: str, *keys: str) -> None:
    for key in (KEY, DEFAULT_KEY, WRONG_UPSTREAM_KEY, ACCESS_KEY, *keys):
        assert key not in out


async def test_demo_passes_and_prints_the_export_lines(run_doctor: Doctor, mock_url: str) -> None:
    run_doctor.demo(mock_url)
    later = {"name": "later", "baseUrl": "https://example.invalid", "apiKeys": ["${DOCTOR_UNSET_KEY}"]}
    run_doctor.channels.append({**later, "status": "disabled"})
    code, out = await run_doctor.run()
    assert code == 0, out
    assert not lines(out, "FAIL")
    assert "OK    channel demo-mock: count_tokens 200 in " in out
    assert "model claude-haiku-4-5 -> mock-haiku" in out
    assert f"OK    port: 127.0.0.1:{run_doctor.port} is free" in out
    assert f"OK    data directory: {run_doctor.data_dir} is writable; ccx.db opens" in out
    assert (Path(run_doctor.data_dir) / "ccx.db").exists()
    assert not list(Path(run_doctor.data_dir).glob(".doctor-*"))  # its test file is gone
    # A disabled channel's unset variable: a warning that names the fix, not a failure.
    [warning] = lines(out, "WARN")
    assert "channel later (disabled): environment variable DOCTOR_UNSET_KEY is not set" in warning
    assert "export DOCTOR_UNSET_KEY=..." in warning
    assert f'  export ANTHROPIC_BASE_URL="http://127.0.0.1:{run_doctor.port}"' in out
    assert f'  export ANTHROPIC_API_KEY="<your PROXY_ACCESS_KEY (…{KEY[-4:]})>"' in out
    assert "No failures (1 warning to look at): clients can use this gateway." in out
    assert_no_secret(out)


async def test_missing_access_key_fails_with_the_fix(
    run_doctor: Doctor, mock_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROXY_ACCESS_KEY")
    run_doctor.demo(mock_url)
    code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert fail.startswith("FAIL  PROXY_ACCESS_KEY: not set")
    assert "export PROXY_ACCESS_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" in fail
    assert "OK    settings: valid" in out  # the other settings are still checked
    assert "OK    channel demo-mock" in out
    assert '  export ANTHROPIC_API_KEY="<your PROXY_ACCESS_KEY>"' in out


@pytest.mark.parametrize("weak", ["changeme", "sk-...", "test", "short-but-random-x7", "ab" * 20])
async def test_a_weak_key_is_a_warning_only(
    run_doctor: Doctor, mock_url: str, monkeypatch: pytest.MonkeyPatch, weak: str
) -> None:
    monkeypatch.setenv("PROXY_ACCESS_KEY", weak)
    run_doctor.demo(mock_url)
    code, out = await run_doctor.run()
    assert code == 0, out  # a weak key still serves: WARN, and the exit status stays 0
    [warning] = lines(out, "WARN")
    assert warning.startswith("WARN  PROXY_ACCESS_KEY: weak: ")
    assert "secrets.token_urlsafe(32)" in warning
    assert weak not in out.replace("export PROXY_ACCESS_KEY", "")


def test_key_weakness_rules() -> None:
    assert doctor.key_weakness(secrets.token_urlsafe(32)) is None
    assert doctor.key_weakness(secrets.token_hex(16)) is None
    assert "placeholder" in (doctor.key_weakness("CHANGE-ME-please-0123456789abcdef") or "")
    assert "placeholder" in (doctor.key_weakness("<your gateway key goes here, ok?>") or "")
    assert "placeholder" in (doctor.key_weakness("Password123") or "")
    assert "characters (use 24" in (doctor.key_weakness("Zq8-vR2_kLm9") or "")
    assert "distinct" in (doctor.key_weakness("0101010101010101010101010101") or "")


async def test_admin_key_equal_to_the_proxy_key_fails(
    run_doctor: Doctor, mock_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADMIN_ACCESS_KEY", KEY)
    run_doctor.demo(mock_url)
    code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert fail.startswith("FAIL  ADMIN_ACCESS_KEY: equals a proxy access key")
    assert "OK    settings: valid" in out  # reported once, by its own check
    assert_no_secret(out)


async def test_unset_variable_on_an_active_channel_fails_with_the_config_message(
    run_doctor: Doctor, mock_url: str
) -> None:
    run_doctor.demo(mock_url, key="${DOCTOR_UPSTREAM_KEY}")
    code, out = await run_doctor.run()
    assert code == 1
    fails = lines(out, "FAIL")
    assert "environment variable DOCTOR_UPSTREAM_KEY is not set (channel 'demo-mock' is active)" in fails[0]
    assert "export DOCTOR_UPSTREAM_KEY=..." in fails[0]
    assert fails[1].startswith("FAIL  channels: not probed")


async def test_upstream_refusing_the_key_fails_with_its_scrubbed_message(
    run_doctor: Doctor, aiohttp_server: Any
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        sent = request.headers.get("x-api-key", "")
        body = {"type": "error", "error": {"type": "authentication_error", "message": f"invalid key {sent}"}}
        return web.json_response(body, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(app)
    run_doctor.demo(str(server.make_url("")), key=WRONG_UPSTREAM_KEY)
    code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert fail.startswith("FAIL  channel demo-mock: count_tokens 401 in ")
    assert f"upstream 401: invalid key sk-…{WRONG_UPSTREAM_KEY[-4:]}" in fail  # the echo, masked
    assert "the upstream refuses the channel's key [sk-…" in fail
    assert_no_secret(out)


async def test_the_mock_refusing_a_wrong_key(run_doctor: Doctor, mock_url: str) -> None:
    run_doctor.demo(mock_url, key=WRONG_UPSTREAM_KEY)
    code, out = await run_doctor.run()
    assert code == 1
    assert "upstream 401: mock upstream: invalid x-api-key" in out
    assert_no_secret(out)


async def test_unreachable_upstream_fails(run_doctor: Doctor) -> None:
    run_doctor.demo(f"http://127.0.0.1:{unused_port()}")
    code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert "count_tokens failed" in fail and "is unreachable" in fail
    assert 'check "baseUrl" and that this machine reaches it' in fail


async def test_a_silent_upstream_is_bounded_by_the_timeout(run_doctor: Doctor, aiohttp_server: Any) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    server = await aiohttp_server(app)
    run_doctor.demo(str(server.make_url("")))
    started = time.monotonic()
    code, out = await run_doctor.run("--timeout", "0.5")
    assert time.monotonic() - started < 5
    assert code == 1
    assert "FAIL  channel demo-mock: no answer from" in out and "within 0.5 s" in out


async def test_count_tokens_404_falls_back_to_a_one_token_message(
    run_doctor: Doctor, aiohttp_server: Any
) -> None:
    mock = MockUpstream()

    async def no_count_tokens(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/count_tokens"):
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return await mock.dispatch(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", no_count_tokens)
    server = await aiohttp_server(app)
    run_doctor.demo(str(server.make_url("")))
    code, out = await run_doctor.run()
    assert code == 0, out
    assert "OK    channel demo-mock: 1-token message 200 in " in out


async def test_unwritable_data_dir_fails(run_doctor: Doctor, mock_url: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    run_doctor.data_dir = str(tmp_path / "a-file" / "data")
    run_doctor.demo(mock_url)
    code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert fail.startswith(f"FAIL  data directory: {run_doctor.data_dir} is not writable: ")
    assert "set DATA_DIR (or --data-dir) to a directory" in fail


async def test_port_in_use_fails_and_says_how_to_find_it(run_doctor: Doctor, mock_url: str) -> None:
    run_doctor.demo(mock_url)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        run_doctor.port = busy.getsockname()[1]
        code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert f"127.0.0.1:{run_doctor.port} is in use (another ccx-proxy may be running there)" in fail
    assert f"ss -ltnp 'sport = :{run_doctor.port}'" in fail


async def test_base_url_ending_in_v1_fails_with_the_fixed_url(
    run_doctor: Doctor, mock_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_doctor.demo(mock_url)
    port = unused_port()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}/v1/")
    code, out = await run_doctor.run()
    assert code == 1
    fails = lines(out, "FAIL")
    assert "ends in /v1: Claude Code appends /v1/messages itself" in fails[0]
    assert f'export ANTHROPIC_BASE_URL="http://127.0.0.1:{port}"' in fails[0]
    # Nothing listens there either: said, with the way to find out more.
    assert fails[1].startswith(f"FAIL  gateway: no ccx-proxy at http://127.0.0.1:{port}: ")
    assert "start the gateway (ccx-proxy serve)" in fails[1]


async def test_a_client_of_a_running_gateway(
    run_doctor: Doctor, mock_url: str, start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await start_gateway({"name": "m", "baseUrl": mock_url, "apiKeys": [DEFAULT_KEY]})
    base = str(gateway.make_url("")).rstrip("/")
    run_doctor.demo(mock_url)
    run_doctor.port = gateway.server.port or 0  # doctor run on the gateway's machine, while it serves
    monkeypatch.setenv("ANTHROPIC_BASE_URL", base)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ACCESS_KEY)
    code, out = await run_doctor.run()
    assert code == 0, out
    assert f"OK    gateway: a ccx-proxy answers at {base} (version " in out
    assert f"OK    client keys: the gateway accepts ANTHROPIC_API_KEY (…{ACCESS_KEY[-4:]})" in out
    assert f"WARN  port: 127.0.0.1:{run_doctor.port} is taken by a running ccx-proxy" in out

    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "another-token-abcdefghijklmnop")
    code, out = await run_doctor.run()
    assert code == 0, out
    assert "WARN  client keys: ANTHROPIC_API_KEY (…6789) and ANTHROPIC_AUTH_TOKEN (…mnop) differ" in out
    assert "set only one of them, to your gateway key" in out

    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "not-the-gateway-key-0000wxyz")
    code, out = await run_doctor.run()
    assert code == 1
    assert "FAIL  client keys: the gateway refuses ANTHROPIC_API_KEY (…wxyz): HTTP 401" in out
    assert_no_secret(out, "not-the-gateway-key-0000wxyz", "another-token-abcdefghijklmnop")


def test_usage_errors_exit_2(capsys: Any) -> None:
    assert cli.main(["doctor", "--timeout", "0"]) == 2
    assert "--timeout must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--port", "not-a-port"])
    assert exc.value.code == 2


def test_export_lines_name_this_machine_for_a_wildcard_bind() -> None:
    lines_ = doctor.export_lines("0.0.0.0", 3000, "sk-" + "k" * 30 + "wxyz")
    assert lines_[1] == f'  export ANTHROPIC_BASE_URL="http://{socket.gethostname()}:3000"'
    assert lines_[2] == '  export ANTHROPIC_API_KEY="<your PROXY_ACCESS_KEY (sk-…wxyz)>"'
    assert doctor.export_lines("::1", 3000, "")[1] == '  export ANTHROPIC_BASE_URL="http://[::1]:3000"'


async def test_no_active_channel_fails(run_doctor: Doctor, mock_url: str) -> None:
    run_doctor.demo(mock_url, status="disabled")
    code, out = await run_doctor.run()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert "none of 1 channels is active" in fail and '"status" to "active"' in fail


async def test_an_egress_proxy_password_is_never_printed(run_doctor: Doctor) -> None:
    password = "hunter2-proxy-password"
    proxy = f"http://doctor:{password}@127.0.0.1:{unused_port()}"
    run_doctor.demo("http://upstream.invalid", proxyUrl=proxy)
    code, out = await run_doctor.run()
    assert code == 1
    assert "FAIL  channel demo-mock:" in out
    assert password not in out
