"""The operator page in a real headless Chromium, against a real router and nats-server.

Debian's `chromium` driven by Debian's `chromium-driver` (/usr/bin/chromedriver) through
Selenium, with both paths given, so Selenium Manager never looks for (or downloads) a
browser or a driver. Without them the test is skipped, saying why; with CI=true it fails.

The router runs with a token, so the page is reached through the login page and works
with its session cookie (the feed too). `UPDATE_SCREENSHOTS=1` also writes the screenshots
to docs/console.png and docs/console-phone.png (else they stay in the test's folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from contracts.oncall import OncallConfig
from router.oncall.alerts import console_link
from tests.support.natsserver import NatsServer
from tests.support.procs import router_executable, router_process, wait_healthy, write_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "console-test-token-8f3a"
# The page must show a change within this long (generous: the machine may be loaded); the
# latency seen is printed, not asserted tightly.
DEADLINE_S = 30.0


def _browser_paths() -> tuple[str, str]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        why = f"{' and '.join(missing)} missing: install Debian's chromium and chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the browser test cannot run: {why}")
        pytest.skip(why)
    return CHROMIUM, CHROMEDRIVER


@contextlib.contextmanager
def chrome(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session; quit (browser and driver stopped) on any exit."""
    browser, driver_path = _browser_paths()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager, if ever asked, stays offline
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    service = Service(executable_path=driver_path)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        with contextlib.suppress(Exception):
            service.stop()


def wait_dom(driver: Any, what: str, check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` (and the page's state)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # an element replaced while read: try again
            last_exc = exc
        time.sleep(0.05)
    logs = ""
    with contextlib.suppress(Exception):
        logs = "\n".join(str(e) for e in driver.get_log("browser"))
    raise AssertionError(f"page: {what} not within {timeout:g}s (last error {last_exc!r}); console:\n{logs}")


def router_pub(config: Path, subject: str, payload: str) -> None:
    out = subprocess.run(
        [router_executable(), "pub", "--config", str(config), subject, payload],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def open_rows(driver: Any, key: str, rule: str) -> int:
    return int(js(driver, "return document.querySelectorAll(arguments[0]).length",
                  f'#open-list li[data-key="{key}"][data-rule="{rule}"]'))


def text(driver: Any, element_id: str) -> str:
    return str(js(driver, "const e = document.getElementById(arguments[0]); return e ? e.textContent : ''", element_id))


def wait_http_url(data_dir: Path, rp: Any, timeout: float = 30.0) -> str:
    path = data_dir / "http.url"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        assert rp.running, f"router exited:\n{rp.tail()}"
        time.sleep(0.05)
    raise AssertionError(f"no {path} within {timeout}s:\n{rp.tail()}")


def test_console_live_board_in_chromium(nats_server: NatsServer, tmp_path: Path) -> None:
    _browser_paths()  # skip (or fail on CI) before starting anything
    from selenium.webdriver.common.by import By

    url = nats_server.url
    config = tmp_path / "config.toml"
    write_config(config, url, http={"listen": "127.0.0.1:0", "token": TOKEN}, rules={"max_future_skew": "1h"})
    with router_process(config) as rp:
        anyio.run(wait_healthy, url, rp)
        base = wait_http_url(tmp_path / "data", rp)
        with chrome() as driver:
            # Behind the token: the login page first, then the page with its cookie.
            driver.get(base + "/")
            wait_dom(driver, "the login form", lambda: driver.find_elements(By.ID, "token"))
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
            wait_dom(driver, "the board", lambda: driver.find_elements(By.ID, "open-list"))
            wait_dom(driver, "the feed connected", lambda: "on" in driver.find_element(By.ID, "live").get_attribute("class"))
            wait_dom(driver, "the as-of marker", lambda: driver.find_element(By.ID, "asof").get_attribute("data-seq"))
            open_before = text(driver, "c-open")

            # A stockout appears on the board, in the feed, and the open counter moves.
            started = time.monotonic()
            router_pub(config, "events.sku.SKU-BT", '{"type":"counted","location":"BLR-DS-4","on_hand":0}')
            published = time.monotonic()
            wait_dom(driver, "the stockout on the board", lambda: open_rows(driver, "SKU-BT", "stockout") == 1)
            seen = time.monotonic()
            wait_dom(driver, "the open counter to move", lambda: text(driver, "c-open") != open_before)
            feed = driver.find_element(By.ID, "feed").text
            assert "SKU-BT out of stock at BLR-DS-4" in feed
            assert int(text(driver, "c-open")) >= 1
            board = text(driver, "g-rule")
            assert "stockout" in board
            wait_dom(driver, "the as-of marker to reach the event",
                     lambda: int(driver.find_element(By.ID, "asof").get_attribute("data-seq")) >= 1)
            print(
                f"\nconsole: stockout on the board {(seen - started) * 1000:.0f} ms after `router pub` started, "
                f"{(seen - published) * 1000:.0f} ms after it returned"
            )

            # Cleared: it leaves the board, the feed says so.
            started = time.monotonic()
            router_pub(config, "events.sku.SKU-BT", '{"type":"received","location":"BLR-DS-4","qty":40}')
            published = time.monotonic()
            wait_dom(driver, "the stockout to leave the board", lambda: open_rows(driver, "SKU-BT", "stockout") == 0)
            seen = time.monotonic()
            print(
                f"console: cleared, off the board {(seen - started) * 1000:.0f} ms after `router pub` started, "
                f"{(seen - published) * 1000:.0f} ms after it returned"
            )
            wait_dom(driver, "the clear in the feed",
                     lambda: "cleared" in driver.find_element(By.CSS_SELECTOR, "#feed li").text.lower())

            # Search and drill down: state, settings, recent events and exceptions of the SKU.
            router_pub(config, "events.sku.SKU-BT", '{"type":"settings","location":"BLR-DS-4","low_stock_threshold":8}')
            box = driver.find_element(By.ID, "search-key")
            box.clear()
            box.send_keys("SKU-BT")
            driver.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
            wait_dom(driver, "the drill-down", lambda: driver.find_element(By.ID, "entity").get_attribute("data-key") == "SKU-BT")
            wait_dom(driver, "three events in its history",
                     lambda: len(driver.find_elements(By.CSS_SELECTOR, "#entity-events li[data-seq]")) >= 3)
            state = driver.find_element(By.ID, "entity-state").text
            assert "locations.BLR-DS-4.available" in state, state
            assert "40" in state, state
            wait_dom(driver, "its settings", lambda: "low_stock_threshold" in driver.find_element(By.ID, "entity-settings").text)
            history = driver.find_element(By.ID, "entity-exceptions").text.lower()
            assert "raised" in history, history
            assert "cleared" in history, history
            assert "counted" in driver.find_element(By.ID, "entity-events").text

            # The link an alert carries (Alertmanager's generatorURL, PagerDuty's client_url)
            # opens the same drill-down, in a page loaded afresh; so does the older `#/kind/key`.
            for link in (console_link(OncallConfig(console_url=base), "sku", "SKU-BT"), base + "/#/sku/SKU-BT"):
                driver.get("about:blank")
                driver.get(link)
                wait_dom(driver, f"the drill-down opened by {link}",
                         lambda: driver.find_element(By.ID, "entity").get_attribute("data-key") == "SKU-BT")
                assert not js(driver, "return document.getElementById('entity').hidden"), link

            # A board with some exceptions and a dead letter, for the README.
            for i, loc in enumerate(["BLR-DS-4", "BLR-DS-7", "DEL-WH-1", "MUM-DS-2"]):
                router_pub(config, f"events.sku.SERUM-{30 + i}", f'{{"type":"counted","location":"{loc}","on_hand":{i}}}')
            router_pub(config, "events.shipment.SHP-1042",
                       '{"type":"booked","promised_by":"2020-01-01T00:00:00Z","carrier":"SURFACE-CO"}')
            router_pub(config, "events.campaign.DIWALI-BOGO", '{"type":"started","skus":["SERUM-30","SERUM-31"],"budget":100}')
            router_pub(config, "events.campaign.DIWALI-BOGO", '{"type":"spend","amount":120.5}')
            subprocess.run([router_executable(), "pub", "--force", "--config", str(config), "events.sku.SERUM-30",
                            '{"type":"picked","location":"BLR-DS-4","qty":"2"}'], capture_output=True, timeout=30, check=True)
            wait_dom(driver, "the new exceptions on the board", lambda: int(text(driver, "c-open")) >= 6)
            wait_dom(driver, "the dead letter listed", lambda: driver.find_elements(By.CSS_SELECTOR, "#dead-list li[data-reason=invalid]"))
            js(driver, "document.getElementById('entity-close').click()")
            js(driver, "window.scrollTo(0, 0)")
            shots = [tmp_path / "console.png"]
            driver.save_screenshot(str(shots[0]))
            driver.set_window_size(412, 915)
            js(driver, "window.scrollTo(0, 0)")
            wait_dom(driver, "the phone layout", lambda: js(driver, "return document.documentElement.scrollWidth <= 430"))
            shots.append(tmp_path / "console-phone.png")
            driver.save_screenshot(str(shots[1]))
            for shot in shots:
                assert shot.stat().st_size > 10_000
                if os.environ.get("UPDATE_SCREENSHOTS") == "1":
                    shutil.copyfile(shot, DOCS / shot.name)
    print(f"console: screenshots {', '.join(str(s) for s in shots)}", file=sys.stderr)


def test_missing_browser_fails_on_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.router.test_console_browser as me

    monkeypatch.setattr(me, "CHROMEDRIVER", "/nonexistent/chromedriver")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and the browser test cannot run"):
        me._browser_paths()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/chromedriver missing"):
        me._browser_paths()
