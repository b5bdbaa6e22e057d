"""The real Claude Code CLI (``claude -p``) through the gateway to the built-in mock upstream.

A wrong ``ANTHROPIC_API_KEY`` must end ``claude -p`` at once with the gateway's message
(the gateway's 401 carries ``x-should-retry: false``; without it Claude Code retries
silently for minutes).  Claude Code runs isolated: a temporary HOME and config dir, no
auto-updater, no non-essential traffic, and only the gateway on 127.0.0.1 to talk to.
Skipped where ``claude`` (npm install -g @anthropic-ai/claude-code) or node is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ccx_proxy.mock_upstream import DEFAULT_KEY, MockUpstream
from tests.conftest import ACCESS_KEY

WRONG_KEY_LIMIT = 10.0  # seconds: a wrong key must not make claude -p hang
ANSWER_LIMIT = 60.0


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def claude() -> str:
    path = shutil.which("claude")
    if path is None or shutil.which("node") is None:
        pytest.skip(
            "Claude Code is not installed: needs node and `claude` on PATH "
            "(npm install -g @anthropic-ai/claude-code)"
        )
    return path


@pytest.fixture
async def gateway_url(aiohttp_server: Any, start_gateway: Any) -> str:
    mock = await aiohttp_server(MockUpstream().app(), host="127.0.0.1")
    gateway = await start_gateway(
        {
            "name": "mock",
            "baseUrl": str(mock.make_url("")),
            "apiKeys": [DEFAULT_KEY],
            "modelMapping": {"opus": "mock-opus", "sonnet": "mock-sonnet", "haiku": "mock-haiku"},
        }
    )
    assert gateway.host == "127.0.0.1"
    return str(gateway.make_url("")).rstrip("/")


async def _claude_p(
    claude: str,
    home: Path,
    base_url: str,
    api_key: str,
    limit: float,
    *args: str,
    essential_only: bool = True,
    **extra_env: str,
) -> Run:
    """``claude -p hi [args]`` with a clean environment; killed (and the test failed) past
    ``limit``.  ``essential_only=False`` leaves out CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC
    (with it Claude Code skips gateway model discovery)."""
    config = home / ".claude"
    config.mkdir()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(config),
        "TMPDIR": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": api_key,
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        **extra_env,
    }
    if not essential_only:
        del env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        claude,
        "-p",
        "hi",
        *args,
        cwd=home,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(
            f"claude -p still running after {limit:g}s; stdout {out.decode()!r}, stderr {err.decode()!r}"
        )
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode(), time.monotonic() - started)


async def test_wrong_key_ends_claude_at_once_with_the_gateways_message(
    claude: str, gateway_url: str, tmp_path: Path
) -> None:
    run = await _claude_p(claude, tmp_path, gateway_url, "sk-not-the-gateway-key", WRONG_KEY_LIMIT)
    # Claude Code 2.1 prints: "Failed to authenticate. API Error: 401 invalid access key: ..."
    assert run.returncode != 0, run
    assert "401" in run.output, run
    assert (
        "invalid access key: it does not match the gateway's PROXY_ACCESS_KEY; send the key the "
        "gateway's operator gave you (ANTHROPIC_API_KEY)"
    ) in " ".join(run.output.split()), run
    assert run.seconds < WRONG_KEY_LIMIT


async def test_right_key_prints_the_upstreams_answer(claude: str, gateway_url: str, tmp_path: Path) -> None:
    run = await _claude_p(claude, tmp_path, gateway_url, ACCESS_KEY, ANSWER_LIMIT)
    assert run.returncode == 0, run
    assert run.stdout.startswith("Hello from the ccx-proxy mock upstream (mock-"), run


async def test_a_refused_channel_key_ends_claude_at_once_naming_the_operator(
    claude: str, aiohttp_server: Any, start_gateway: Any, tmp_path: Path
) -> None:
    mock = await aiohttp_server(MockUpstream().app(), host="127.0.0.1")
    gateway = await start_gateway(
        {"name": "mock", "baseUrl": str(mock.make_url("")), "apiKeys": ["sk-revoked-upstream-key-0000"]}
    )
    url = str(gateway.make_url("")).rstrip("/")
    run = await _claude_p(claude, tmp_path, url, ACCESS_KEY, WRONG_KEY_LIMIT)
    # The upstream's 401 is about the channel's key: the gateway's 502 (x-should-retry: false)
    # ends claude at once instead of "Repeated 529 Overloaded errors" after retries.
    assert run.returncode != 0, run
    # Claude Code 2.1 prints: "API Error: 502 upstream channel 'mock' refused the gateway's key
    # (401 authentication_error); the gateway's operator must fix ... check your inference gateway"
    assert "API Error: 502 upstream channel 'mock' refused the gateway's key (401" in run.output, run
    assert "sk-revoked-upstream-key-0000" not in run.output
    assert run.seconds < WRONG_KEY_LIMIT


async def test_a_denied_model_ends_claude_at_once_naming_the_served_models(
    claude: str, aiohttp_server: Any, start_gateway: Any, tmp_path: Path
) -> None:
    mock = await aiohttp_server(MockUpstream().app(), host="127.0.0.1")
    gateway = await start_gateway(
        {
            "name": "mock",
            "baseUrl": str(mock.make_url("")),
            "apiKeys": [DEFAULT_KEY],
            "modelMapping": {"sonnet": "mock-sonnet"},
            "supportedModels": ["claude-sonnet-*"],
        }
    )
    url = str(gateway.make_url("")).rstrip("/")
    run = await _claude_p(claude, tmp_path, url, ACCESS_KEY, WRONG_KEY_LIMIT, "--model", "claude-opus-4-8")
    # A 404 would print Claude Code's own "There's an issue with the selected model"; the
    # gateway's 400 is printed verbatim:
    # "API Error: 400 model_not_found: this gateway does not serve model 'claude-opus-4-8'; it
    # serves claude-sonnet-5, claude-sonnet-4-6, claude-sonnet-4-5 (GET /v1/models lists them)"
    assert run.returncode != 0, run
    assert (
        "API Error: 400 model_not_found: this gateway does not serve model 'claude-opus-4-8'; "
        "it serves claude-sonnet-5, claude-sonnet-4-6, claude-sonnet-4-5 (GET /v1/models lists them)"
    ) in run.output, run
    assert "issue with the selected model" not in run.output, run
    assert run.seconds < WRONG_KEY_LIMIT


@pytest.mark.parametrize("suffix", ["/v1", "/v1/messages"])
async def test_a_base_url_with_v1_tells_the_user_to_use_the_gateway_root(
    claude: str, gateway_url: str, tmp_path: Path, suffix: str
) -> None:
    run = await _claude_p(claude, tmp_path, gateway_url + suffix, ACCESS_KEY, WRONG_KEY_LIMIT)
    # Claude Code prints: "API Error: 400 wrong ANTHROPIC_BASE_URL: set it to the gateway root
    # (e.g. http://gateway-host:3000), without /v1 -- clients append /v1/messages themselves
    # (this request went to /v1/v1/messages)"
    assert run.returncode != 0, run
    assert "API Error: 400 wrong ANTHROPIC_BASE_URL: set it to the gateway root" in run.output, run
    assert f"(this request went to {suffix}/v1/messages)" in run.output, run
    assert "issue with the selected model" not in run.output, run
    assert run.seconds < WRONG_KEY_LIMIT


async def test_gateway_model_discovery_caches_exactly_the_served_claude_ids(
    claude: str, gateway_url: str, tmp_path: Path
) -> None:
    run = await _claude_p(
        claude,
        tmp_path,
        gateway_url,
        ACCESS_KEY,
        ANSWER_LIMIT,
        essential_only=False,
        CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY="1",
    )
    assert run.returncode == 0, run
    # Claude Code 2.1 fetches GET /v1/models?limit=1000, keeps ids starting with claude or
    # anthropic and caches them (its model picker lists them "From gateway").
    cache = tmp_path / ".claude" / "cache" / "gateway-models.json"
    assert cache.exists(), (run, sorted(str(p) for p in tmp_path.rglob("*")))
    cached = json.loads(cache.read_text())
    assert cached["baseUrl"] == gateway_url
    assert [m["id"] for m in cached["models"]] == [
        "claude-opus-4-8",
        "claude-opus-4-7",
        "claude-opus-4-6",
        "claude-opus-4-5",
        "claude-sonnet-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
    ]
    assert cached["models"][0]["display_name"] == "Claude Opus 4.8"
