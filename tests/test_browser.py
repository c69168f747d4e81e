"""The browser page at `/`, driven in headless Chromium (Debian's chromium + chromium-driver,
installed by scripts/setup-browser). The page runs the `shoal-client` package (its vendored copy,
through an import map): search over the WebSocket with msgpack, then live subscriptions over
the WebSocket and over SSE (EventSource), each showing a document upserted through the API."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup-browser (Debian chromium + chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    profile = tempfile.mkdtemp(prefix="shoal-chromium-", dir="/tmp")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def api(server: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{server.url}{path}", json=body, timeout=60.0)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def test_search_and_live_matches_in_the_page(server: ServerProcess, browser: webdriver.Chrome) -> None:
    name = f"browser_{uuid.uuid4().hex[:8]}"
    api(server, "/v1/collections", {"name": name})
    api(
        server,
        f"/v1/collections/{name}/upsert",
        {
            "docs": [
                {"id": "cat", "text": "A cat is sleeping on the warm windowsill.", "metadata": {"kind": "pet"}},
                {"id": "tax", "text": "The quarterly tax filing deadline is next Monday."},
                {"id": "ship", "text": "The container ship docked in the harbour at dawn."},
            ]
        },
    )
    wait = WebDriverWait(browser, 30)
    try:
        browser.get(f"{server.url}/")
        assert browser.title == "Shoal"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#collection option[value='{name}']"))
        Select(browser.find_element(By.ID, "collection")).select_by_value(name)

        # Search: the WebSocket + msgpack path.
        browser.find_element(By.ID, "query").send_keys("a kitten napping by the window")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.hit"))
        results = browser.find_elements(By.CSS_SELECTOR, "#results li.hit")
        assert results[0].get_attribute("data-id") == "cat"
        assert "windowsill" in results[0].text and '"kind":"pet"' in results[0].text

        # Live, once per transport: a WebSocket subscription, then the SSE helper (EventSource).
        threshold = browser.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys("0.4")
        for transport, label, new_id in (("ws", "WebSocket", "kitten"), ("sse", "SSE", "kitten2")):
            Select(browser.find_element(By.ID, "transport")).select_by_value(transport)
            browser.find_element(By.ID, "watch").click()
            banner = f"Live ({label})"
            wait.until(lambda d: d.find_element(By.ID, "live-status").text.startswith(banner))  # noqa: B023
            api(
                server,
                f"/v1/collections/{name}/upsert",
                {
                    "docs": [
                        {"id": f"bonds_{transport}", "text": "Bond yields rose after the central bank meeting."},
                        {"id": new_id, "text": "A tiny kitten naps by the sunny window."},
                    ]
                },
            )
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#live li.match[data-id='{new_id}']"))  # noqa: B023
            live = [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "#live li.match")]
            assert live == [new_id], (transport, live)
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda d: d.find_element(By.ID, "live-status").text == "Stopped.")

        # Everything the page loaded came from Shoal itself: the client package and msgpack.
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert any(url.endswith("/static/vendor/shoal-client/client.js") for url in loaded), loaded
        assert any(url.endswith("/static/vendor/msgpack/index.mjs") for url in loaded), loaded
        assert all(url.startswith(server.url) or url.startswith("ws") for url in loaded), loaded
        # The page's error reporting shows the typed error's code.
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("5")
        api(server, "/v1/collections", {"name": f"{name}_gone"})
        browser.find_element(By.ID, "refresh").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#collection option[value='{name}_gone']"))
        Select(browser.find_element(By.ID, "collection")).select_by_value(f"{name}_gone")
        httpx.delete(f"{server.url}/v1/collections/{name}_gone", timeout=30.0).raise_for_status()
        browser.find_element(By.ID, "search").click()
        wait.until(lambda d: d.find_element(By.ID, "search-status").text.startswith("not_found:"))
    except Exception:
        shot = server.data_dir / "browser-failure.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}\npage:\n{browser.page_source[:4000]}")
        raise


def test_create_add_filter_and_live_count_in_the_page(server: ServerProcess, browser: webdriver.Chrome) -> None:
    """The page's own writes: a collection created and documents added from the page, the count
    badge following the change feed (also for a write made elsewhere), a filtered keyword search,
    and the favicon."""
    name = f"page_{uuid.uuid4().hex[:8]}"
    # The page re-renders the collection list and counts as the change feed arrives: an element
    # read mid-render is stale, and the wait looks again.
    wait = WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException])
    try:
        browser.get(f"{server.url}/")
        icon = browser.find_element(By.CSS_SELECTOR, "link[rel='icon']").get_attribute("href")
        assert icon is not None and httpx.get(icon, timeout=30).status_code == 200
        browser.find_element(By.ID, "new-collection").send_keys(name)
        browser.find_element(By.ID, "create").click()
        chosen = lambda d: Select(d.find_element(By.ID, "collection")).first_selected_option  # noqa: E731
        wait.until(lambda d: chosen(d).get_attribute("value") == name)
        wait.until(lambda d: d.find_element(By.ID, "count").text == "0 docs")

        for doc_id, text, meta in (
            ("n1", "libxml2 fails to parse the v1.2 manifest", '{"kind": "bug"}'),
            ("n2", "libxml2 release notes for packagers", '{"kind": "doc"}'),
        ):
            browser.find_element(By.ID, "doc-id").send_keys(doc_id)
            browser.find_element(By.ID, "doc-text").send_keys(text)
            meta_box = browser.find_element(By.ID, "doc-meta")
            meta_box.clear()
            meta_box.send_keys(meta)
            browser.find_element(By.ID, "add").click()
            wait.until(lambda d: d.find_element(By.ID, "add-status").text.startswith(f"Added {doc_id}"))  # noqa: B023
        wait.until(lambda d: d.find_element(By.ID, "count").text == "2 docs")
        # A write from another client moves the badge too: it follows the change feed.
        api(server, f"/v1/collections/{name}/upsert", {"docs": [{"id": "n3", "text": "weather for the weekend"}]})
        wait.until(lambda d: d.find_element(By.ID, "count").text == "3 docs")

        browser.find_element(By.ID, "query").send_keys("libxml2")
        Select(browser.find_element(By.ID, "mode")).select_by_value("keyword")
        browser.find_element(By.ID, "where").send_keys('{"kind": "bug"}')
        browser.find_element(By.ID, "search").click()
        wait.until(lambda d: d.find_element(By.ID, "search-status").text.startswith("1 result"))
        assert [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "#results li.hit")] == [
            "n1"
        ]
        # A filter that is not JSON is reported, not sent.
        browser.find_element(By.ID, "where").send_keys("}")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda d: "filter must be JSON" in d.find_element(By.ID, "search-status").text)
    except Exception:
        shot = server.data_dir / "browser-failure-2.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}\npage:\n{browser.page_source[:4000]}")
        raise
