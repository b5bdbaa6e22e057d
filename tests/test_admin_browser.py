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
from ccx_proxy.presets import PRESETS
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
KEY_TEMPLATE = "<your gateway key: PROXY_ACCESS_KEY>"
PHONE = {"width": 390, "height": 844}  # an iPhone's viewport, in CSS pixels

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
    demo = json.loads((REPO / "channels.example.json").read_text())  # what `make run` starts from
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

    # Connect panel: the gateway root (no /v1) and a template for the key (see its own test).
    expect(tab.locator("#connect-snippet")).to_have_text(
        f'export ANTHROPIC_BASE_URL="{gateway.url}"\nexport ANTHROPIC_API_KEY="{KEY_TEMPLATE}"'
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


# ------------------------------------------------------------ helpers for the tests below


def _sign_in(tab: Page, gateway: Gateway) -> None:
    tab.goto(f"{gateway.url}/admin/")
    tab.get_by_label("Admin access key").fill(ADMIN_KEY)
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.locator('tr[data-name="demo-mock"]:not(.note-row)')).to_contain_text("mock-opus")


def _admin(gateway: Gateway, path: str, body: Any = None) -> Any:
    """The admin API's JSON, as any API client sees it (not the console's rendering of it)."""
    request = urllib.request.Request(
        f"{gateway.url}/api/messages/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"x-api-key": ADMIN_KEY, "content-type": "application/json"},
        method="GET" if body is None else "POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


def _add_channels(gateway: Gateway, *names: str) -> None:
    """Disabled channels after the demo one (the next priorities), added through the admin API."""
    for name in names:
        _admin(
            gateway,
            "channels",
            {
                "name": name,
                "baseUrl": gateway.mock_url,
                "apiKeys": ["mock-upstream-key"],
                "modelMapping": {"sonnet": f"{name}-sonnet"},
                "status": "disabled",
            },
        )


def _priorities(gateway: Gateway) -> dict[str, int]:
    return {c["name"]: c["priority"] for c in json.loads(gateway.config.read_text())["channels"]}


# Every rendered element that reaches past the viewport's left or right edge, and the page's
# scroll width: content clipped inside a scroll box (a table wrapper, the dialog body) counts too;
# visually hidden text (clipped to nothing, for screen readers) does not.
_OVERFLOW_JS = """() => {
  const width = document.documentElement.clientWidth;
  const hidden = (el) => {
    for (let node = el; node && node !== document.body; node = node.parentElement) {
      if (getComputedStyle(node).clip === "rect(0px, 0px, 0px, 0px)") return true;
    }
    return false;
  };
  const wide = [];
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if ((!box.width && !box.height) || hidden(el)) continue;
    if (box.left < -1 || box.right > width + 1) {
      const name = `${el.tagName.toLowerCase()}#${el.id}.${el.className}`;
      wide.push(`${name} ${Math.round(box.left)}..${Math.round(box.right)}`);
    }
  }
  return { scrollWidth: document.documentElement.scrollWidth, clientWidth: width, wide: wide.slice(0, 10) };
}"""


def _assert_fits(tab: Page, where: str) -> None:
    sizes = tab.evaluate(_OVERFLOW_JS)
    assert sizes["clientWidth"] == PHONE["width"], sizes
    assert sizes["scrollWidth"] <= sizes["clientWidth"], f"{where}: the page scrolls sideways: {sizes}"
    assert sizes["wide"] == [], f"{where}: wider than the screen: {sizes['wide']}"


# ------------------------------------------------------------ phone, template, order, try it, thinking


def test_console_fits_a_390px_phone(gateway: Gateway, page: tuple[Page, list[str]]) -> None:
    tab, problems = page
    _add_channels(gateway, "deepseek-example", "a-channel-with-a-rather-long-name-for-a-phone")
    tab.set_viewport_size({"width": PHONE["width"], "height": PHONE["height"]})
    tab.goto(f"{gateway.url}/admin/")
    expect(tab.get_by_label("Admin access key")).to_be_focused()
    _assert_fits(tab, "sign in")
    tab.get_by_label("Admin access key").fill(ADMIN_KEY)
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.locator('tr[data-name="demo-mock"]:not(.note-row)')).to_contain_text("mock-opus")
    _assert_fits(tab, "channel list")

    # The Connect card, export lines and Copy button included, fits the screen: nothing hidden
    # to the right and no sideways scrolling inside the code block.
    connect = tab.locator("#connect")
    connect.scroll_into_view_if_needed()
    expect(tab.locator(".connect-main")).to_be_in_viewport(ratio=1)
    expect(tab.get_by_role("button", name="Copy template")).to_be_in_viewport(ratio=1)
    snippet = tab.locator("#connect-snippet")
    assert snippet.evaluate("el => el.scrollWidth <= el.clientWidth"), "the export lines scroll sideways"
    assert connect.evaluate("el => el.getBoundingClientRect().right") <= PHONE["width"]
    tab.get_by_role("button", name="Show route").click()
    expect(tab.locator("#route-result")).to_contain_text("channel demo-mock")
    _assert_fits(tab, "connect card with a route preview")
    tab.evaluate("document.activeElement.blur()")
    tab.locator(".connect-main").evaluate("el => el.scrollIntoView({block: 'start'})")
    tab.screenshot(path=str(DOCS / "console-mobile.png"))

    # A row's test result, shown under it.
    row = tab.locator('tr[data-name="demo-mock"]:not(.note-row)')
    row.get_by_role("button", name="Test demo-mock").click()
    expect(tab.locator('tr.note-row[data-name="demo-mock"]')).to_contain_text("OK", timeout=15_000)
    _assert_fits(tab, "test result")

    # The add form, filled from a preset, with a mapping hit showing.
    tab.get_by_role("button", name="Add channel").click()
    form = tab.get_by_role("dialog", name="Add channel")
    form.get_by_role("button", name="DeepSeek").click()
    form.get_by_label("Test a model name").fill("claude-sonnet-4-6")
    expect(form.locator(".row-map.hit")).to_have_count(1)
    for part in ("#presets", "#key-rows", "#map-rows", "#f-thinkingSignatures", "#save-channel"):
        form.locator(part).scroll_into_view_if_needed()
        _assert_fits(tab, f"add form at {part}")
    form.get_by_role("button", name="Cancel").first.click()
    expect(form).to_be_hidden()

    # The edit form and the delete confirmation.
    row.get_by_role("button", name="Edit demo-mock").click()
    edit = tab.get_by_role("dialog", name="Edit channel demo-mock")
    expect(edit.get_by_role("textbox", name="Name", exact=True)).to_have_value("demo-mock")
    _assert_fits(tab, "edit form")
    edit.get_by_role("button", name="Cancel").first.click()
    tab.get_by_role("button", name="Delete deepseek-example").click()
    confirm = tab.get_by_role("dialog", name="Delete channel?")
    expect(confirm).to_be_visible()
    _assert_fits(tab, "delete confirmation")
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    assert problems == []


def test_connect_lines_are_a_template_not_a_key(gateway: Gateway, page: tuple[Page, list[str]]) -> None:
    tab, problems = page
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.url)
    _sign_in(tab, gateway)
    lines = f'export ANTHROPIC_BASE_URL="{gateway.url}"\nexport ANTHROPIC_API_KEY="{KEY_TEMPLATE}"'
    snippet = tab.locator("#connect-snippet")
    expect(snippet).to_have_text(lines)
    # Nothing key-like in the lines: neither the key nor its mask (which could pass for one).
    text = snippet.inner_text()
    assert PROXY_KEY not in text and mask_secret(PROXY_KEY) not in text and "…" not in text

    # The visible note says it is a template, and which key to put in (by its mask).
    note = tab.locator("#connect-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Template:")
    expect(note).to_contain_text(f"Replace {KEY_TEMPLATE} with the value of PROXY_ACCESS_KEY")
    expect(note).to_contain_text(f"masked as {mask_secret(PROXY_KEY)}")
    expect(snippet).to_have_attribute("aria-describedby", "connect-note")

    # What is copied is exactly the template.
    tab.get_by_role("button", name="Copy template").click()
    expect(tab.locator("#copy-connect")).to_have_text("Copied")
    assert tab.evaluate("navigator.clipboard.readText()") == lines
    expect(tab.locator("#announcer")).to_contain_text(f"a template: replace {KEY_TEMPLATE}")
    assert problems == []


def test_deleting_a_channel_renumbers_priorities_without_gaps(
    gateway: Gateway, page: tuple[Page, list[str]]
) -> None:
    tab, problems = page
    _add_channels(gateway, "second")
    before = ["demo-mock", "anthropic", "deepseek", "kimi", "glm", "second"]
    assert _priorities(gateway) == {name: i for i, name in enumerate(before, start=1)}
    _sign_in(tab, gateway)
    tab.get_by_role("button", name="Delete deepseek").click()
    tab.get_by_role("dialog", name="Delete channel?").get_by_role("button", name="Delete").click()
    expect(tab.locator('tr[data-name="deepseek"]')).to_have_count(0)
    rows = tab.locator("#channel-rows tr:not(.note-row)")
    after = ["demo-mock", "anthropic", "kimi", "glm", "second"]
    expect(rows.locator("td.num")).to_have_text(["1", "2", "3", "4", "5"])
    expect(rows.locator(".name")).to_have_text(after)
    status = tab.locator("#status-line")
    expect(status).to_have_text("Deleted channel deepseek; the others are numbered 1 to 5.")
    # In the file (one write: the server renumbers), in the same routing order, and as the
    # admin API reports it.
    assert _priorities(gateway) == {name: i for i, name in enumerate(after, start=1)}
    listed = _admin(gateway, "channels")["channels"]
    assert [(c["name"], c["priority"]) for c in listed] == [(name, i) for i, name in enumerate(after, 1)]

    tab.get_by_role("button", name="Delete second").click()
    tab.get_by_role("dialog", name="Delete channel?").get_by_role("button", name="Delete").click()
    expect(status).to_have_text("Deleted channel second; the others are numbered 1 to 4.")
    expect(rows.locator("td.num")).to_have_text(["1", "2", "3", "4"])
    assert list(_priorities(gateway).values()) == [1, 2, 3, 4]
    assert problems == []


def test_try_it_follows_channel_changes(gateway: Gateway, page: tuple[Page, list[str]]) -> None:
    tab, problems = page
    _sign_in(tab, gateway)
    config = tab.locator("#route-config")
    result = tab.locator("#route-result")
    suggestions = tab.locator("#route-models option")
    expect(config).to_contain_text("Serving now, in order: demo-mock.")
    expect(suggestions).to_have_count(8)  # demo-mock maps opus, sonnet, haiku: every Claude Code id
    expect(tab.locator('#route-models option[value="claude-opus-4-1"]')).to_have_count(0)
    tab.get_by_label("Requested model name").fill("claude-opus-4-1")
    tab.get_by_role("button", name="Show route").click()
    expect(result).to_contain_text("claude-opus-4-1 → channel demo-mock, upstream model mock-opus")

    # Add a channel in front for that one id: the panel follows without a page reload.
    tab.get_by_role("button", name="Add channel").click()
    form = tab.get_by_role("dialog", name="Add channel")
    form.get_by_role("textbox", name="Name", exact=True).fill("front")
    form.get_by_role("textbox", name="Base URL", exact=True).fill(gateway.mock_url)
    form.get_by_label("API key, key 1").fill("mock-upstream-key")
    form.get_by_label("Request model contains, row 1").fill("opus")
    form.get_by_label("Upstream model, row 1").fill("front-opus")
    form.get_by_label("Supported models").fill("claude-opus-4-1")
    form.get_by_label("Priority").fill("0")
    form.get_by_role("button", name="Save channel").click()
    expect(form).to_be_hidden()
    expect(result).to_contain_text("claude-opus-4-1 → channel front, upstream model front-opus")
    expect(result).to_contain_text("Fails over to: demo-mock (mock-opus)")
    expect(result).to_contain_text("Updated for the current channels")
    expect(config).to_contain_text("Serving now, in order: front → demo-mock.")
    expect(tab.locator('#route-models option[value="claude-opus-4-1"]')).to_have_count(1)

    # Disabling it (a row action, not the form) moves the route back.
    tab.get_by_role("button", name="Disable front").click()
    expect(result).to_contain_text("claude-opus-4-1 → channel demo-mock, upstream model mock-opus")
    expect(config).to_contain_text("Serving now, in order: demo-mock.")
    expect(tab.locator('#route-models option[value="claude-opus-4-1"]')).to_have_count(0)

    # An edit of the file behind the console's back shows after a Refresh (the watcher reloads it).
    doc = json.loads(gateway.config.read_text())
    for channel in doc["channels"]:
        channel["status"] = "active" if channel["name"] == "front" else channel["status"]
    gateway.config.write_text(json.dumps(doc, indent=2))
    deadline = time.monotonic() + 10
    while _admin(gateway, "route?model=claude-opus-4-1")["channel"] != "front":
        assert time.monotonic() < deadline, "the gateway did not reload the edited file"
        time.sleep(0.05)
    tab.get_by_role("button", name="Refresh").click()
    expect(result).to_contain_text("claude-opus-4-1 → channel front, upstream model front-opus")
    expect(config).to_contain_text("Serving now, in order: front → demo-mock.")
    assert problems == []


PRESET_THINKING = {
    "Anthropic": ("strip-foreign", False, False),
    "DeepSeek": ("strip-foreign", True, True),
    "Kimi": ("strip-foreign", False, True),
    "GLM": ("strip-foreign", False, True),
}
assert PRESET_THINKING == {  # what ccx_proxy.presets says, which the console shows
    p["label"]: (
        p["channel"].get("thinkingSignatures", "keep"),
        p["channel"].get("thinkingPassback", False),
        p["channel"].get("stripBillingBlock", False),
    )
    for p in PRESETS.values()
}


def test_thinking_options_round_trip(gateway: Gateway, page: tuple[Page, list[str]]) -> None:
    tab, problems = page
    _sign_in(tab, gateway)
    tab.get_by_role("button", name="Add channel").click()
    form = tab.get_by_role("dialog", name="Add channel")
    # The one channel form, whichever name its dialog has (Add channel, Edit channel X).
    signatures = tab.locator("#channel-form").get_by_label("Thinking signatures")
    passback = tab.locator("#channel-form").get_by_label("Pass back thinking on tool-use turns")
    billing = tab.locator("#channel-form").get_by_label("Strip Claude Code's billing line from system")
    expect(signatures).to_have_value("keep")
    expect(passback).not_to_be_checked()
    expect(billing).not_to_be_checked()
    # Each option names the upstream error it is for.
    expect(form.locator("#h-thinkingSignatures")).to_contain_text("Invalid signature in thinking block")
    expect(form.locator("#h-thinkingPassback")).to_contain_text("must be passed back to the API")
    expect(form.locator("#h-stripBillingBlock")).to_contain_text("x-anthropic-billing-header")

    def expect_options(values: tuple[str, bool, bool]) -> None:
        expect(signatures).to_have_value(values[0])
        (expect(passback).to_be_checked if values[1] else expect(passback).not_to_be_checked)()
        (expect(billing).to_be_checked if values[2] else expect(billing).not_to_be_checked)()

    for label, values in PRESET_THINKING.items():
        form.get_by_role("button", name=label, exact=True).click()
        expect_options(values)

    # Save the DeepSeek preset (on the mock upstream): the file and the API hold the options.
    form.get_by_role("button", name="DeepSeek", exact=True).click()
    form.get_by_role("textbox", name="Name", exact=True).fill("deepseek-2")
    form.get_by_role("textbox", name="Base URL", exact=True).fill(gateway.mock_url)
    form.get_by_label("Status").select_option("disabled")
    form.get_by_role("button", name="Save channel").click()
    expect(form).to_be_hidden()
    saved = _admin(gateway, "channels/deepseek-2")
    assert (saved["thinkingSignatures"], saved["thinkingPassback"], saved["stripBillingBlock"]) == (
        "strip-foreign",
        True,
        True,
    )
    row = tab.locator('tr[data-name="deepseek-2"]:not(.note-row)')
    expect(row).to_contain_text("thinking: signatures strip-foreign, passback, strip billing line")

    # Reopened, the form shows them; turning two back to their defaults leaves them out.
    row.get_by_role("button", name="Edit deepseek-2").click()
    edit = tab.get_by_role("dialog", name="Edit channel deepseek-2")
    expect_options(PRESET_THINKING["DeepSeek"])
    edit.get_by_label("Thinking signatures").select_option("strip-all")
    edit.get_by_label("Pass back thinking on tool-use turns").uncheck()
    edit.get_by_role("button", name="Save channel").click()
    expect(edit).to_be_hidden()
    saved = _admin(gateway, "channels/deepseek-2")
    assert saved["thinkingSignatures"] == "strip-all" and saved["stripBillingBlock"] is True
    assert "thinkingPassback" not in saved
    stored = next(c for c in json.loads(gateway.config.read_text())["channels"] if c["name"] == "deepseek-2")
    assert {k: stored.get(k) for k in ("thinkingSignatures", "thinkingPassback", "stripBillingBlock")} == {
        "thinkingSignatures": "strip-all",
        "thinkingPassback": None,
        "stripBillingBlock": True,
    }
    row.get_by_role("button", name="Edit deepseek-2").click()
    expect_options(("strip-all", False, True))
    edit.get_by_role("button", name="Cancel").first.click()

    # All off: none of the three fields is written.
    row.get_by_role("button", name="Edit deepseek-2").click()
    edit.get_by_label("Thinking signatures").select_option("keep")
    edit.get_by_label("Strip Claude Code's billing line from system").uncheck()
    edit.get_by_role("button", name="Save channel").click()
    expect(edit).to_be_hidden()
    saved = _admin(gateway, "channels/deepseek-2")
    assert not {"thinkingSignatures", "thinkingPassback", "stripBillingBlock"} & set(saved)
    expect(row).not_to_contain_text("thinking:")
    assert problems == []
