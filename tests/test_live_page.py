"""The browser page's live result sets, in headless Chromium: "Watch the top 10" shows the
current list and documents entering and leaving it; "Watch this query" shows a match leaving.
Over both transports (WebSocket subscription, SSE EventSource)."""

from __future__ import annotations

import uuid

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.server_process import ServerProcess
from tests.test_browser import api, browser

__all__ = ["browser"]  # the headless Chromium fixture of tests/test_browser.py


def shown(driver: webdriver.Chrome, css: str) -> list[str]:
    """The data-ids of the items `css` selects, read in one step (items leave on timers)."""
    ids: list[str] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((li) => li.dataset.id)", css
    )
    return ids


def test_top_10_and_leave_in_the_page(server: ServerProcess, browser: webdriver.Chrome) -> None:
    name = f"page_live_{uuid.uuid4().hex[:8]}"
    api(server, "/v1/collections", {"name": name})
    cats = [
        "A cat is sleeping on the warm windowsill.",
        "The kitten chased a ball of yarn.",
        "Two cats share a sunny window seat.",
    ]
    others = [f"Quarterly report number {i} about shipping logistics." for i in range(10)]
    docs = [{"id": f"cat{i}", "text": t} for i, t in enumerate(cats)] + [
        {"id": f"other{i}", "text": t} for i, t in enumerate(others)
    ]
    api(server, f"/v1/collections/{name}/upsert", {"docs": docs})
    wait = WebDriverWait(browser, 30)
    browser.get(f"{server.url}/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#collection option[value='{name}']"))
    Select(browser.find_element(By.ID, "collection")).select_by_value(name)
    browser.find_element(By.ID, "query").send_keys("a cat napping by the window")
    for transport, label in (("ws", "WebSocket"), ("sse", "SSE")):
        Select(browser.find_element(By.ID, "transport")).select_by_value(transport)
        browser.find_element(By.ID, "watch-top").click()
        wait.until(lambda d: d.find_element(By.ID, "live-status").text.startswith(f"Live top 10 ({label})"))  # noqa: B023
        wait.until(lambda d: len(shown(d, "#live li.match:not(.left)")) == 10)
        top = shown(browser, "#live li.match:not(.left)")
        assert top[:3] == ["cat0", "cat2", "cat1"] or set(top[:3]) == {"cat0", "cat1", "cat2"}, top
        # A new best document enters at the top; the 10th drops out and is shown leaving.
        new_id = f"kitten_{transport}"
        api(server, f"/v1/collections/{name}/upsert", {"docs": [{"id": new_id, "text": "A cat naps by the window."}]})
        wait.until(lambda d: shown(d, "#live li.match:not(.left)")[:1] == [new_id])  # noqa: B023
        assert new_id in shown(browser, "#live li.entered")
        wait.until(lambda d: top[-1] in shown(d, "#live li.left"))  # noqa: B023
        # Deleted: it leaves the list, and the list is refilled to 10.
        api(server, f"/v1/collections/{name}/delete", {"ids": [new_id]})
        wait.until(lambda d: new_id not in shown(d, "#live li.match:not(.left)"))  # noqa: B023
        wait.until(lambda d: len(shown(d, "#live li.match:not(.left)")) == 10)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_element(By.ID, "live-status").text == "Stopped.")

    # "Watch this query": a match, then its leave when it is re-upserted out of the results.
    threshold = browser.find_element(By.ID, "threshold")
    threshold.clear()
    threshold.send_keys("0.4")
    Select(browser.find_element(By.ID, "transport")).select_by_value("ws")
    browser.find_element(By.ID, "watch").click()
    wait.until(lambda d: d.find_element(By.ID, "live-status").text.startswith("Live (WebSocket)"))
    api(server, f"/v1/collections/{name}/upsert", {"docs": [{"id": "moggy", "text": "A cat sleeps by the window."}]})
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#live li.match[data-id='moggy']"))
    api(server, f"/v1/collections/{name}/upsert", {"docs": [{"id": "moggy", "text": "Freight rates fell again."}]})
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#live li.left[data-id='moggy']"))
    browser.find_element(By.ID, "stop").click()
