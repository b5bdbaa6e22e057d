"""The console's Overview page in a real browser, against a real gateway with live traffic.

Same setup as ``test_admin_team_browser`` (its gateway and page fixtures: Debian's Chromium
driven by Playwright, ``serve --with-mock-upstream`` with a team database).  Requests go
through the gateway while the page is open; its numbers must match what ``/metrics`` serves.
With ``CCX_SCREENSHOT_DIR`` set, the test keeps ``console-overview.png`` there.  With a real
redis-server in ``REDIS_URL``: the count of instances reporting, and the notice while Redis is down.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import RedisServer
from tests.test_admin_browser import ADMIN_KEY, DOCS, PHONE, PROXY_KEY, Gateway, _assert_fits, _sign_in
from tests.test_admin_browser import pytestmark as browser_marks
from tests.test_admin_team_browser import _OPENER, _message, _team, _until
from tests.test_admin_team_browser import gateway as gateway  # noqa: F401 - the fixture
from tests.test_admin_team_browser import page as page  # noqa: F401 - the fixture

try:
    from playwright.sync_api import Page, expect
except ImportError:  # pragma: no cover - depends on the environment
    pass

pytestmark = browser_marks


def _scraped_requests(gateway: Gateway) -> float:
    request = urllib.request.Request(
        f"{gateway.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    with _OPENER.open(request, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ccx_requests_total"
    )


def _traffic(gateway: Gateway, stop: threading.Event, sent: list[int]) -> None:
    """A few requests a second, in waves, until stopped: the line on the page has a shape."""
    models = ("claude-sonnet-4-6", "claude-opus-4-1", "claude-haiku-4-5")
    wave = 0
    while not stop.is_set():
        for i in range(2 + wave % 4):
            sent.append(_message(gateway, PROXY_KEY, models[i % 3], words=4 + i))
        wave += 1
        stop.wait(0.4)


def test_overview_shows_live_rates_errors_and_ttfb(gateway: Gateway, page: tuple[Page, list[str]]) -> None:  # noqa: F811
    tab, problems = page
    _sign_in(tab, gateway)
    nav = tab.get_by_role("navigation", name="Sections")
    nav.get_by_role("link", name="Overview").click()
    expect(nav.get_by_role("link", name="Overview")).to_have_attribute("aria-current", "page")
    expect(tab.get_by_role("heading", name="Overview", level=1)).to_be_focused()
    assert tab.title() == "Overview · ccx-proxy admin"
    row = tab.locator('#overview-rows tr[data-name="demo-mock"]')
    expect(row.locator('[data-label="State"]')).to_have_text("available")
    expect(tab.locator("#overview-instances, #overview-notice")).to_have_count(0)  # no REDIS_URL

    # A member allowed 2 requests a minute: their third is refused with a 429, an error.
    member = _team(gateway, "members", "POST", {"name": "bob", "limits": {"rpm": 2}})["key"]
    assert [_message(gateway, member) for _ in range(3)] == [200, 200, 429]
    stop, sent = threading.Event(), []
    worker = threading.Thread(target=_traffic, args=(gateway, stop, sent), daemon=True)
    worker.start()
    try:
        # Rates need two looks, 2 s apart: then requests/s, errors and TTFB are numbers.
        tiles = tab.locator("#overview-totals")
        expect(tiles.locator(".total", has_text="Requests/s").locator(".big")).to_have_text(
            re.compile(r"^\d+(\.\d+)?$"), timeout=8000
        )
        expect(tiles.locator(".total", has_text="Error rate").locator(".big")).to_have_text(
            re.compile(r"^\d")
        )
        expect(tiles.locator(".total", has_text="TTFB p50").locator(".big")).to_have_text(
            re.compile(r"^\d+ ms$")
        )
        expect(tab.locator("#overview-facts")).to_contain_text("Over the last")
        expect(row.locator('[data-label="TTFB p95"]')).to_have_text(re.compile(r"^\d+ ms$"))
        expect(row.locator('[data-label="Requests/s"]')).to_have_text(re.compile(r"^\d"))
        expect(tab.locator("#overview-chart svg polyline.rps")).to_have_count(1, timeout=8000)
        time.sleep(4.5)  # a few more updates: a line worth a screenshot
    finally:
        stop.set()
        worker.join(10)
    assert sent and set(sent) == {200}, sent

    # Once the traffic stops, the page and /metrics agree on the count (the same numbers).
    expected = len(sent) + 3
    _until("the scrape counts every request", lambda: _scraped_requests(gateway) == expected)
    total = tab.locator("#overview-totals .total", has_text="Requests/s").locator(".sub")
    expect(total).to_have_text(f"{expected} since the gateway started", timeout=5000)
    expect(row.locator('[data-label="Requests"]')).to_have_text(str(expected - 1))  # the 429: no channel
    available = tab.locator("#overview-totals .total", has_text="Channels available").locator(".big")
    expect(available).to_have_text("1 of 1")  # the demo's four disabled presets are not counted
    error_rate = tab.locator("#overview-totals .total", has_text="Error rate")
    expect(error_rate).to_have_class(re.compile(r"\bbad\b"))
    assert tab.locator("#overview-chart svg").get_attribute("aria-label").startswith("Requests per second")
    tab.screenshot(path=str(DOCS / "console-overview.png"))

    # Auto-refresh off: the page stops asking.
    tab.locator("#overview-auto").uncheck()
    before = tab.locator("#overview-updated").inner_text()
    time.sleep(2.5)
    assert tab.locator("#overview-updated").inner_text() == before
    tab.get_by_role("button", name="Refresh").click()
    expect(tab.locator("#overview-updated")).not_to_have_text(before)

    # A phone: tiles two by two, the channel table as cards, nothing wider than the screen.
    tab.set_viewport_size({"width": PHONE["width"], "height": PHONE["height"]})
    expect(row.locator('[data-label="State"]')).to_be_visible()
    _assert_fits(tab, "overview")
    assert problems == []


@pytest.fixture
def redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A redis-server of the test's own, in the environment before the gateway starts."""
    server = RedisServer()
    server.start()
    monkeypatch.setenv("REDIS_URL", server.url)
    monkeypatch.setenv("REDIS_PREFIX", f"t{secrets.token_hex(4)}:")
    yield server
    server.close()


def test_overview_counts_instances_and_says_when_redis_is_down(
    redis: RedisServer,
    gateway: Gateway,  # noqa: F811 - after redis: it reads REDIS_URL as it starts
    page: tuple[Page, list[str]],  # noqa: F811
) -> None:
    tab, problems = page
    _sign_in(tab, gateway)
    tab.get_by_role("navigation", name="Sections").get_by_role("link", name="Overview").click()
    instances = tab.locator("#overview-instances")
    expect(instances).to_have_text("1 instance reporting")
    expect(tab.locator("#overview-facts")).to_contain_text(
        "every gateway instance sharing Redis", timeout=8000
    )
    assert _message(gateway, PROXY_KEY) == 200
    requests = tab.locator("#overview-totals .total", has_text="Requests/s").locator(".sub")
    expect(requests).to_have_text("1 since the gateway started", timeout=5000)

    redis.stop()  # the gateway notices within a second; the page at its next update
    notice = tab.locator("#overview-notice")
    expect(notice).to_have_text("Redis down: this host only", timeout=10_000)
    expect(instances).to_have_count(0)
    expect(tab.locator("#overview-facts")).not_to_contain_text("sharing Redis")
    expect(requests).to_have_text("1 since the gateway started")  # this host's numbers

    redis.start()
    expect(notice).to_have_count(0, timeout=15_000)
    expect(instances).to_have_text("1 instance reporting")
    assert problems == []
