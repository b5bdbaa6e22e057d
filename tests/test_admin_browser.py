"""The web admin console (/admin/) in a real browser, against a real gateway process.

Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright's Python API; the
gateway runs ``serve --with-mock-upstream`` as a subprocess.  Everything talks to
127.0.0.1 only.  The test takes the console's screenshots; ``make screenshots``
(``CCX_SCREENSHOT_DIR=docs``) keeps them as the README's images.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ccx_proxy.headers import mask_secret
from tests.conftest import unused_port

try:
    from playwright.sync_api import ConsoleMessage, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

REPO = Path(__file__).resolve().parent.parent
DOCS = Path(os.environ.get("CCX_SCREENSHOT_DIR") or tempfile.gettempdir())
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
PROXY_KEY = "proxy-key-for-browser-test-7f3a"
ADMIN_KEY = "admin-key-for-browser-test-91c2"
TIMEOUT_MS = 10_000

_missing = [
    what
    for what, ok in (
        ("the playwright Python package", sync_playwright is not None),
        (f"Chromium at {CHROMIUM}", CHROMIUM.exists()),
    )
    if not ok
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_missing) and not os.environ.get("CI"),  # CI installs both: a missing one must fail there
        reason=f"browser test needs {' and '.join(_missing)} "
        "(pip install playwright; apt-get install chromium)",
    ),
]


@dataclass
class Gateway:
    url: str
    mock_url: str
    config: Path


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    port, mock_port = unused_port(), unused_port()
    demo = json.loads((REPO / "channels.json").read_text())
    demo["channels"][0]["baseUrl"] = f"http://127.0.0.1:{mock_port}"
    config = tmp_path / "channels.json"
    config.write_text(json.dumps(demo, indent=2))
    drop = ("PROXY_ACCESS_KEY", "EXTRA_PROXY_ACCESS_KEYS", "ADMIN_ACCESS_KEY", "CHANNELS_FILE", "PORT")
    env = {k: v for k, v in os.environ.items() if k not in (*drop, "BIND_HOST", "MOCK_UPSTREAM_KEY")}
    env.update(PROXY_ACCESS_KEY=PROXY_KEY, ADMIN_ACCESS_KEY=ADMIN_KEY)
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccx_proxy", "serve", "--with-mock-upstream"]
            + ["--port", str(port), "--mock-port", str(mock_port), "--config", config.name],
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp_path,  # so the console shows the short relative path "channels.json"
        )
    try:
        deadline = time.monotonic() + 20
        while "listening on" not in stdout.read_text():
            assert proc.poll() is None, f"gateway exited: {stderr.read_text()}"
            assert time.monotonic() < deadline, f"no banner within 20 s: {stderr.read_text()}"
            time.sleep(0.05)
        yield Gateway(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mock_port}", config)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
    log = stderr.read_text()
    assert proc.returncode == 0, log
    assert ADMIN_KEY not in log and PROXY_KEY not in log and "mock-upstream-key" not in log


@pytest.fixture
def page() -> Iterator[tuple[Page, list[str]]]:
    assert sync_playwright is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=20_000)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 860})
            context.set_default_timeout(TIMEOUT_MS)
            # Nothing but the gateway on 127.0.0.1: anything else is a bug (or a CDN).
            context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), lambda route: route.abort())
            tab = context.new_page()
            problems: list[str] = []

            def on_console(msg: ConsoleMessage) -> None:
                # Chromium logs every 4xx fetch; the 400 is the test's own validation step.
                if msg.type == "error" and "status of 400" not in msg.text:
                    problems.append(f"console: {msg.text}")

            tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            tab.on("console", on_console)
            yield tab, problems
        finally:
            browser.close()


def _post_message(gateway: Gateway, model: str) -> tuple[dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        f"{gateway.url}/v1/messages",
        data=json.dumps(
            {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        ).encode(),
        headers={"x-api-key": PROXY_KEY, "content-type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    with opener.open(request, timeout=10) as response:
        assert response.status == 200
        return dict(response.headers), json.loads(response.read())


def test_console_signs_in_adds_tests_and_routes_a_channel(
    gateway: Gateway, page: tuple[Page, list[str]]
) -> None:
    tab, problems = page
    DOCS.mkdir(exist_ok=True)

    # Sign in: the key goes to session storage, never into the URL or the page.
    tab.goto(f"{gateway.url}/admin/")
    expect(tab.get_by_label("Admin access key")).to_be_focused()
    tab.get_by_label("Admin access key").fill(ADMIN_KEY)
    tab.get_by_role("button", name="Sign in").click()
    demo_row = tab.locator('tr[data-name="demo-mock"]:not(.note-row)')
    expect(demo_row).to_contain_text("mock-opus")
    expect(demo_row).to_contain_text("…-key")  # masked
    assert tab.evaluate("sessionStorage.getItem('ccx-admin-key')") == ADMIN_KEY
    assert ADMIN_KEY not in tab.url

    # Connect panel: the gateway root (no /v1) and a placeholder with the proxy key's hint.
    expect(tab.locator("#connect-snippet")).to_have_text(
        f'export ANTHROPIC_API_KEY="<your PROXY_ACCESS_KEY ({mask_secret(PROXY_KEY)})>"\n'
        f'export ANTHROPIC_BASE_URL="{gateway.url}"'
    )

    # Add channel: the form opens with focus on its first field.
    tab.get_by_role("button", name="Add channel").click()
    form = tab.get_by_role("dialog", name="Add channel")
    expect(form.get_by_role("textbox", name="Name", exact=True)).to_be_focused()
    form.get_by_role("textbox", name="Name", exact=True).fill("browser-added")
    form.get_by_role("textbox", name="Base URL", exact=True).fill("ftp://127.0.0.1")
    form.get_by_label("API key, key 1").fill("mock-upstream-key")
    form.get_by_label("Request model contains, row 1").fill("opus")
    form.get_by_label("Upstream model, row 1").fill("mock-opus")
    form.get_by_label("Priority").fill("0")

    # The API's field-level problem shows at the field.
    form.get_by_role("button", name="Save channel").click()
    base_url = form.get_by_role("textbox", name="Base URL", exact=True)
    expect(base_url).to_have_attribute("aria-invalid", "true")
    expect(form.locator('[data-field="baseUrl"] .field-error')).to_contain_text("not an http(s) URL")
    expect(form.locator("#form-errors")).to_be_focused()
    base_url.fill(gateway.mock_url)
    expect(form.locator(".field-error")).to_have_count(0)

    # The mapping tester shows which row a name hits.
    form.get_by_label("Test a model name").fill("claude-opus-4-1")
    expect(form.locator("#map-result")).to_contain_text("claude-opus-4-1 → mock-opus")
    expect(form.locator(".row-map.hit")).to_have_count(1)
    tab.screenshot(path=str(DOCS / "admin-add-channel.png"))

    form.get_by_role("button", name="Save channel").click()
    expect(form).to_be_hidden()
    row = tab.locator('tr[data-name="browser-added"]:not(.note-row)')
    expect(row).to_contain_text("…-key")
    expect(row.locator("td.num")).to_have_text("0")
    expect(tab.get_by_role("button", name="Edit browser-added")).to_be_focused()

    # Test: the result shows inline under the row.
    row.get_by_role("button", name="Test browser-added").click()
    note = tab.locator('tr.note-row[data-name="browser-added"]')
    expect(note).to_contain_text("OK", timeout=15_000)
    expect(note).to_contain_text("mock-opus")

    # A real request through the gateway now goes to the new channel.
    headers, body = _post_message(gateway, "claude-opus-4-1")
    assert headers["x-ccx-channel"] == "browser-added"
    assert body["model"] == "mock-opus"

    saved = json.loads(gateway.config.read_text())
    channel = next(c for c in saved["channels"] if c["name"] == "browser-added")
    assert channel == {
        "name": "browser-added",
        "serviceType": "claude",
        "baseUrl": gateway.mock_url,
        "apiKeys": ["mock-upstream-key"],  # stored as written, not masked
        "authHeader": "auto",
        "modelMapping": {"opus": "mock-opus"},
        "priority": 0,
        "status": "active",
    }

    # Live state after the request, and the route preview.
    tab.get_by_role("button", name="Refresh").click()
    expect(row.locator("td.live")).to_contain_text("healthy")
    expect(row.locator("td.live")).to_contain_text("1 req")
    tab.get_by_label("Requested model name").fill("claude-opus-4-1")
    tab.get_by_role("button", name="Show route").click()
    expect(tab.locator("#route-result")).to_contain_text("channel browser-added, upstream model mock-opus")
    tab.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    tab.screenshot(path=str(DOCS / "admin-messages.png"))

    assert ADMIN_KEY not in tab.content()
    assert problems == []
