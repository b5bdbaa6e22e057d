"""The console's team pages (Members, Usage) in a real browser, against a real gateway.

Same setup as ``test_admin_browser``: Debian's Chromium driven by Playwright, the gateway
as a ``serve --with-mock-upstream`` subprocess, here with a team database (``DATA_DIR``)
and prices for two of the mock's three models.  Requests go through the gateway with the
members' own keys; everything stays on 127.0.0.1.  With ``CCX_SCREENSHOT_DIR`` set, the
usage test keeps ``console-members.png`` and ``console-usage.png`` there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccx_proxy.team.reports import COLUMNS
from tests.conftest import unused_port
from tests.test_admin_browser import (
    ADMIN_KEY,
    CHROMIUM,
    CHROMIUM_ARGS,
    DOCS,
    PHONE,
    PROXY_KEY,
    REPO,
    TIMEOUT_MS,
    Gateway,
    _assert_fits,
    _sign_in,
)
from tests.test_admin_browser import pytestmark as browser_marks

try:
    from playwright.sync_api import ConsoleMessage, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = browser_marks
KEY = re.compile(r"^ccx-[A-Za-z0-9_-]{43}$")
PRICES = {"mock-opus": {"input": 15, "output": 75}, "mock-sonnet": {"input": 3, "output": 15}}  # haiku: none
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    port, mock_port = unused_port(), unused_port()
    demo = json.loads((REPO / "channels.example.json").read_text())
    demo["channels"][0]["baseUrl"] = f"http://127.0.0.1:{mock_port}"
    demo["prices"] = PRICES
    config = tmp_path / "channels.json"
    config.write_text(json.dumps(demo, indent=2))
    drop = ("PROXY_ACCESS_KEY", "EXTRA_PROXY_ACCESS_KEYS", "ADMIN_ACCESS_KEY", "CHANNELS_FILE", "PORT")
    env = {k: v for k, v in os.environ.items() if k not in (*drop, "BIND_HOST", "MOCK_UPSTREAM_KEY")}
    env.update(PROXY_ACCESS_KEY=PROXY_KEY, ADMIN_ACCESS_KEY=ADMIN_KEY, DATA_DIR=str(tmp_path / "data"))
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccx_proxy", "serve", "--with-mock-upstream"]
            + ["--port", str(port), "--mock-port", str(mock_port), "--config", config.name],
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp_path,
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
    assert ADMIN_KEY not in log and PROXY_KEY not in log
    assert not re.search(r"ccx-[A-Za-z0-9_-]{43}", log + stdout.read_text()), "a member key was logged"


@pytest.fixture
def page(gateway: Gateway) -> Iterator[tuple[Page, list[str]]]:
    assert sync_playwright is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=20_000)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
            context.set_default_timeout(TIMEOUT_MS)
            context.route(re.compile(r"^(?!(http://127\.0\.0\.1:|blob:))"), lambda route: route.abort())
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.url)
            tab = context.new_page()
            problems: list[str] = []

            def on_console(msg: ConsoleMessage) -> None:
                # Chromium logs every 4xx fetch; the 400s are the tests' own validation steps.
                if msg.type == "error" and "status of 400" not in msg.text:
                    problems.append(f"console: {msg.text}")

            tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            tab.on("console", on_console)
            yield tab, problems
        finally:
            browser.close()


# ------------------------------------------------------------ HTTP, as any client sees it


def _call(url: str, method: str = "GET", body: Any = None, key: str = ADMIN_KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"x-api-key": key, "content-type": "application/json"},
        method=method,
    )
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _team(gateway: Gateway, path: str, method: str = "GET", body: Any = None) -> Any:
    status, raw = _call(f"{gateway.url}/api/{path}", method, body)
    assert status in (200, 201), (status, raw)
    return json.loads(raw)


def _message(gateway: Gateway, key: str, model: str = "claude-sonnet-4-6", words: int = 8) -> int:
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hello " * words}]}
    return _call(f"{gateway.url}/v1/messages", "POST", body, key)[0]


def _until(what: str, check: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def _storage(tab: Page) -> str:
    return str(tab.evaluate("JSON.stringify([{...sessionStorage}, {...localStorage}])"))


def _read_key(tab: Page, title: str) -> str:
    """The key in the key dialog, checked for its form and the warning and lines around it."""
    dialog = tab.get_by_role("dialog", name=title)
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Store it now: it is not shown again")
    key = tab.locator("#key-value").inner_text()
    assert KEY.match(key), key
    origin = tab.evaluate("location.origin")
    exports = tab.locator("#key-exports").inner_text()
    assert exports == f'export ANTHROPIC_BASE_URL="{origin}"\nexport ANTHROPIC_API_KEY="{key}"'
    expect(dialog.get_by_role("button", name="Copy key")).to_be_focused()
    assert key not in _storage(tab)
    return key


def _close_key(tab: Page, key: str) -> None:
    dialog = tab.locator("#key-dialog")
    dialog.get_by_role("button", name="Done").click()
    expect(dialog).to_be_hidden()
    assert key not in tab.content()
    assert key not in tab.evaluate("document.body.innerText + document.documentElement.outerHTML")
    assert key not in _storage(tab)


# ------------------------------------------------------------ members


def test_members_page_adds_edits_rotates_revokes_and_deletes(
    gateway: Gateway, page: tuple[Page, list[str]]
) -> None:
    tab, problems = page
    _sign_in(tab, gateway)

    # The nav: real links, the current one marked; the page's heading takes focus.
    nav = tab.get_by_role("navigation", name="Sections")
    expect(nav.get_by_role("link", name="Messages")).to_have_attribute("aria-current", "page")
    nav.get_by_role("link", name="Members").focus()
    tab.keyboard.press("Enter")
    expect(tab.get_by_role("heading", name="Members", level=1)).to_be_focused()
    expect(nav.get_by_role("link", name="Members")).to_have_attribute("aria-current", "page")
    expect(nav.get_by_role("link", name="Messages")).not_to_have_attribute("aria-current", "page")
    assert tab.url.endswith("#members")
    expect(tab.locator("#member-rows")).to_contain_text("No members yet")
    expect(tab.locator("#members-facts")).to_contain_text("ccx.db")

    # Add: a client-side problem and a server-side one, each at its field.
    tab.get_by_role("button", name="Add member").click()
    form = tab.get_by_role("dialog", name="Add member")
    expect(form.get_by_label("Name")).to_be_focused()
    form.get_by_label("Name").fill("alice")
    form.get_by_label("Requests per minute").fill("1.5")
    form.get_by_role("button", name="Add member").click()
    expect(form.get_by_label("Requests per minute")).to_have_attribute("aria-invalid", "true")
    expect(form.locator('[data-field="limits.rpm"] .field-error')).to_have_text("a whole number, 0 or more")
    form.get_by_label("Requests per minute").fill("60")
    expect(form.locator(".field-error")).to_have_count(0)
    form.get_by_label("Models").fill("claude-*\nbad*pattern")
    form.get_by_role("button", name="Add member").click()
    expect(form.locator('[data-field="models"] .field-error')).to_contain_text("may only stand at the start")
    expect(form.locator("#member-errors")).to_be_focused()
    form.get_by_label("Models").fill("")
    form.get_by_role("button", name="Add member").click()
    expect(form).to_be_hidden()

    # The key: shown once, copyable, gone from the page and the storages after Done.
    key = _read_key(tab, "Key for alice")
    tab.locator("#key-dialog").get_by_role("button", name="Copy key").click()
    assert tab.evaluate("navigator.clipboard.readText()") == key
    _close_key(tab, key)
    expect(tab.get_by_role("button", name="Add member")).to_be_focused()
    row = tab.locator('#member-rows tr[data-name="alice"]')
    expect(row).to_contain_text("active")
    expect(row.locator("code.key-prefix")).to_have_text(key[:8] + "…")
    expect(row).to_contain_text("60 rpm")
    expect(row.locator(".last-used")).to_have_text("never")
    assert _message(gateway, key) == 200
    assert _message(gateway, key + "x") == 401
    tab.get_by_role("button", name="Refresh").click()
    expect(row.locator(".last-used time")).to_have_text(re.compile(r"just now|\d+ s ago"))
    assert row.locator(".last-used time").get_attribute("title")

    # Edit limits: cleared fields clear the limit; models and channels are set.
    row.get_by_role("button", name="Edit limits of alice").click()
    edit = tab.get_by_role("dialog", name="Edit limits of alice")
    expect(edit.get_by_label("Requests per minute")).to_have_value("60")
    expect(edit.get_by_label("Name")).to_be_hidden()
    edit.get_by_label("Requests per minute").fill("")
    edit.get_by_label("Daily tokens").fill("100000")
    edit.get_by_label("Daily USD").fill("2.5")
    edit.get_by_label("Max concurrent requests").fill("3")
    edit.get_by_label("Models").fill("claude-*")
    edit.get_by_role("checkbox", name="demo-mock").check()
    edit.get_by_role("button", name="Save").click()
    expect(edit).to_be_hidden()
    expect(row.get_by_role("button", name="Edit limits of alice")).to_be_focused()
    saved = _team(gateway, "members/alice")
    assert saved["limits"] == {"maxConcurrent": 3, "dailyTokens": 100000, "dailyUsd": 2.5}
    assert (saved["models"], saved["channels"]) == (["claude-*"], ["demo-mock"])
    expect(row.locator(".limits")).to_contain_text("3 concurrent")
    expect(row.locator(".limits")).to_contain_text("100K tokens/day")
    expect(row.locator(".limits")).to_contain_text("$2.50/day")
    expect(row.locator(".access")).to_contain_text("models: claude-*")
    expect(row.locator(".access")).to_contain_text("channels: demo-mock")
    assert _message(gateway, key) == 200

    # Rotate (confirmed): the old key is refused, the new one works.
    row.get_by_role("button", name="Rotate the key of alice").click()
    confirm = tab.get_by_role("dialog", name="Rotate key?")
    expect(confirm).to_contain_text(key[:8])
    confirm.get_by_role("button", name="Rotate key").click()
    new_key = _read_key(tab, "New key for alice")
    assert new_key != key
    _close_key(tab, new_key)
    expect(row.get_by_role("button", name="Rotate the key of alice")).to_be_focused()
    expect(row.locator("code.key-prefix")).to_have_text(new_key[:8] + "…")
    _until("the old key is refused", lambda: _message(gateway, key) == 401)
    assert _message(gateway, new_key) == 200

    # Revoke, re-activate, revoke.
    row.get_by_role("button", name="Revoke alice").click()
    expect(row.locator(".badge")).to_have_text("revoked")
    assert _team(gateway, "members/alice")["status"] == "revoked"
    _until("a revoked key is refused", lambda: _message(gateway, new_key) == 401)
    row.get_by_role("button", name="Re-activate alice").click()
    expect(row.locator(".badge")).to_have_text("active")
    _until("a re-activated key works", lambda: _message(gateway, new_key) == 200)
    expect(tab.locator("#members-status")).to_have_text("alice is active again: their key works.")

    # Delete (a cancelled confirmation first).
    row.get_by_role("button", name="Delete alice").click()
    confirm = tab.get_by_role("dialog", name="Delete member?")
    confirm.get_by_role("button", name="Cancel").click()
    expect(row.get_by_role("button", name="Delete alice")).to_be_focused()
    row.get_by_role("button", name="Delete alice").click()
    confirm.get_by_role("button", name="Delete").click()
    expect(row).to_have_count(0)
    expect(tab.get_by_role("button", name="Add member")).to_be_focused()
    assert _call(f"{gateway.url}/api/members/alice")[0] == 404
    _until("a deleted member's key is refused", lambda: _message(gateway, new_key) == 401)

    # Back to Messages by the nav: the channel list is there.
    nav.get_by_role("link", name="Messages").click()
    expect(tab.locator('tr[data-name="demo-mock"]:not(.note-row)')).to_be_visible()
    expect(tab.locator("#members-view")).to_be_hidden()
    assert ADMIN_KEY not in tab.content()
    assert problems == []


# ------------------------------------------------------------ usage


def _seed(gateway: Gateway) -> dict[str, str]:
    """Members with keys, and requests through the gateway with each (and the shared key)."""
    keys = {}
    for name, limits in (
        ("alice", {"dailyTokens": 200000, "rpm": 120}),
        ("bob", {"dailyUsd": 5}),
        ("carol@example.com", {}),
    ):
        keys[name] = _team(gateway, "members", "POST", {"name": name, "limits": limits})["key"]
    plan = [
        ("alice", "claude-opus-4-1", 4000),
        ("alice", "claude-sonnet-4-6", 2000),
        ("alice", "claude-opus-4-1", 3000),
        ("bob", "claude-sonnet-4-6", 2500),
        ("bob", "claude-haiku-4-5", 1200),
        ("carol@example.com", "claude-haiku-4-5", 2400),
    ]
    for name, model, words in plan:
        assert _message(gateway, keys[name], model, words) == 200
    assert _message(gateway, PROXY_KEY, "claude-sonnet-4-6", 900) == 200
    _until(
        "usage reaches the database",
        lambda: _team(gateway, "usage?since=1d")["totals"]["requests"] == len(plan) + 1,
    )
    return keys


def _seed_history(gateway: Gateway, days: int = 6) -> None:
    """Earlier days for the chart, written straight into the daily totals the reports read
    (the gateway writes only today's): the screenshot shows a week, not one bar."""
    db = gateway.config.parent / "data" / "ccx.db"
    conn = sqlite3.connect(db, timeout=5)
    try:
        today = time.time()
        rows = []
        for back in range(1, days + 1):
            day = time.strftime("%Y-%m-%d", time.gmtime(today - back * 86400))
            for i, (member, model) in enumerate(
                [("alice", "mock-opus"), ("bob", "mock-sonnet"), ("carol@example.com", "mock-haiku")]
            ):
                scale = (days - back + 2) * (3 - i) * 150 + (back % 3) * 120
                priced = model != "mock-haiku"
                usd = PRICES.get(model, {"input": 0, "output": 0})
                values = {
                    "requests": 3 + back + i,
                    "errors": 1 if back == 3 and i == 0 else 0,
                    "input_tokens": scale * 4,
                    "output_tokens": scale,
                    "cache_write_5m": 0,
                    "cache_write_1h": 0,
                    "cache_read": scale * 2,
                    "cost_usd": scale * (6 * usd["input"] + usd["output"]) / 1e6,  # cache reads at input
                    "unpriced": 0 if priced else 3 + back + i,
                }
                rows.append((day, member, model, "demo-mock", *(values[c] for c in COLUMNS)))
        names = ", ".join(("day", "member", "model", "channel", *COLUMNS))
        marks = ", ".join("?" * (4 + len(COLUMNS)))
        with conn:
            conn.executemany(f"INSERT INTO usage_daily ({names}) VALUES ({marks})", rows)
    finally:
        conn.close()


def test_usage_page_totals_chart_csv_and_a_phone(gateway: Gateway, page: tuple[Page, list[str]]) -> None:
    tab, problems = page
    DOCS.mkdir(exist_ok=True)
    _seed(gateway)
    today = _team(gateway, "usage?since=1d")["totals"]
    assert today["requests"] == 7 and today["unpriced"] == 2 and today["cost_usd"] > 0
    _seed_history(gateway)
    week = _team(gateway, "usage?since=7d&groupBy=day,member")

    # Members, with today's usage per member.
    _sign_in(tab, gateway)
    tab.get_by_role("navigation", name="Sections").get_by_role("link", name="Members").click()
    rows = tab.locator("#member-rows tr")
    expect(rows).to_have_count(3)
    alice = tab.locator('#member-rows tr[data-name="alice"]')
    expect(alice.locator(".today")).to_contain_text("/ 200K")
    assert alice.locator(".today").inner_text().split()[0] != "0"
    expect(alice.locator(".last-used time")).to_be_visible()
    tab.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    tab.screenshot(path=str(DOCS / "console-members.png"))

    # Usage: the last 7 days stacked by member.
    tab.get_by_role("link", name="Usage").click()
    expect(tab.get_by_role("heading", name="Usage", level=1)).to_be_focused()
    totals = tab.locator("#usage-totals")
    expect(totals).to_contain_text(f"{week['totals']['requests']:,}")
    expect(totals).to_contain_text(f"{week['totals']['unpriced']} requests unpriced")
    chart = tab.locator("#usage-chart svg")
    expect(chart).to_have_attribute("role", "img")
    assert "Tokens per day" in (chart.locator("title").first.text_content() or "")
    expect(chart).to_have_accessible_name(re.compile(r"^Tokens per day from \S+ to \S+, stacked by member"))
    bars = chart.locator("rect")
    expect(bars).to_have_count(len(week["rows"]))  # one segment per day and member with usage
    assert all(float(h) > 0 for h in bars.evaluate_all("rs => rs.map(r => r.getAttribute('height'))"))
    legend = tab.locator("#usage-legend")
    for name in ("alice", "bob", "carol@example.com", "shared"):
        expect(legend).to_contain_text(name)
    expect(tab.locator("#usage-chart-table tbody tr")).to_have_count(7)
    expect(tab.locator("#usage-rows tr")).to_have_count(4)
    expect(tab.locator("#usage-group-title")).to_have_text("By member")
    tab.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    tab.screenshot(path=str(DOCS / "console-usage.png"), full_page=True)

    # USD and stacked by model: the unpriced model has no cost bars.
    tab.get_by_role("radio", name="USD").check()
    expect(tab.locator("#usage-chart-caption")).to_have_text("Cost in USD per day, stacked by member")
    tab.get_by_role("radio", name="Model").check()
    expect(tab.locator("#usage-group-title")).to_have_text("By model")
    expect(legend).to_contain_text("mock-opus")
    expect(chart.locator('rect[data-series="mock-opus"]')).not_to_have_count(0)
    expect(chart.locator('rect[data-series="mock-haiku"]')).to_have_count(0)
    tab.get_by_role("radio", name="Tokens").check()
    expect(chart.locator('rect[data-series="mock-haiku"]')).not_to_have_count(0)

    # A filter narrows everything to one member.
    tab.get_by_role("combobox", name="Member", exact=True).fill("bob")
    tab.get_by_role("button", name="Apply").click()
    bob = _team(gateway, "usage?since=7d&member=bob")["totals"]
    expect(totals).to_contain_text(f"{bob['requests']:,}")
    expect(legend).not_to_contain_text("mock-opus")

    # The CSV: the same query, downloaded with the admin key (a Blob URL, not a navigation).
    with tab.expect_download() as download:
        tab.get_by_role("link", name="Download CSV").click()
    text = Path(download.value.path()).read_text()
    lines = text.splitlines()
    assert lines[0] == ",".join(["day", "model", *COLUMNS])
    assert len(lines) > 1 and all(",mock-" in line for line in lines[1:])
    tab.get_by_role("combobox", name="Member", exact=True).fill("")
    tab.get_by_role("radio", name="Member").check()
    tab.get_by_role("button", name="Apply").click()
    with tab.expect_download() as download:
        tab.get_by_role("link", name="Download CSV").click()
    text = Path(download.value.path()).read_text()
    assert text.splitlines()[0] == ",".join(["day", "member", *COLUMNS])
    assert ",alice," in text and ",carol@example.com," in text
    assert download.value.suggested_filename.startswith("ccx-usage-")

    # A custom range with no data: an empty chart, said in words.
    tab.get_by_label("Range", exact=True).select_option("custom")
    tab.get_by_label("From", exact=True).fill("2020-01-01")
    tab.get_by_label("To", exact=True).fill("2020-01-03")
    tab.get_by_role("button", name="Apply").click()
    expect(tab.locator("#usage-range")).to_contain_text("no requests in this range")
    expect(chart.locator("rect")).to_have_count(0)
    expect(tab.locator("#usage-chart-table tbody tr")).to_have_count(3)
    tab.get_by_label("Range", exact=True).select_option("7d")
    expect(bars).not_to_have_count(0)

    # A 390 px phone: both pages and the member dialogs fit without sideways scrolling.
    tab.set_viewport_size({"width": PHONE["width"], "height": PHONE["height"]})
    expect(bars).not_to_have_count(0)
    _assert_fits(tab, "usage page")
    tab.get_by_text("The chart's numbers as a table").click()
    expect(tab.locator("#usage-chart-table tbody tr").first).to_be_visible()
    _assert_fits(tab, "the chart's numbers")
    tab.locator("#usage-rows").scroll_into_view_if_needed()
    _assert_fits(tab, "usage rows")
    tab.get_by_role("link", name="Members").click()
    expect(rows).to_have_count(3)
    _assert_fits(tab, "members page")
    tab.get_by_role("button", name="Add member").click()
    form = tab.get_by_role("dialog", name="Add member")
    _assert_fits(tab, "add member form")
    form.get_by_label("Name").fill("dave")
    form.get_by_role("button", name="Add member").click()
    key = _read_key(tab, "Key for dave")
    _assert_fits(tab, "key dialog")
    _close_key(tab, key)
    assert problems == []
