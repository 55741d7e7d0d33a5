"""`/docs` in a real browser (headless Chromium, as the playground's tests): Swagger UI renders every
operation from assets this server serves itself, under its CSP, with no request leaving 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fakes import FakeEngine
from test_playground_browser import WAIT_S, browser  # noqa: F401 (the fixture)
from test_uvicorn_e2e import uvicorn_serving

from service.routes.docs import CONTENT_SECURITY_POLICY

with suppress(ImportError):  # without selenium the browser fixture fails, saying what to install
    from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow  # a browser start: a few seconds

OPERATIONS = {
    ("POST", "/generate"),
    ("POST", "/v1/images/generations"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
}
RENDERED = """
return Array.from(document.querySelectorAll('.opblock')).map((block) => [
  block.querySelector('.opblock-summary-method').textContent.trim(),
  block.querySelector('.opblock-summary-path').getAttribute('data-path'),
]);
"""
NETWORK_SCHEMES = ("http", "https", "ws", "wss", "ftp")
LOCAL_SCHEMES = ("data", "blob", "about", "chrome", "chrome-untrusted")
RESOURCES = """
return [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
  .map((entry) => entry.name);
"""


def on_this_machine(url: str) -> bool:
    """127.0.0.1, or a scheme the browser answers itself (its own new-tab page's chrome:// assets, data:)."""
    parts = urlsplit(url)
    return parts.hostname == "127.0.0.1" if parts.scheme in NETWORK_SCHEMES else parts.scheme in LOCAL_SCHEMES


def read_the_docs(driver: Any, url: str) -> tuple[set[tuple[str, str]], list[str], list[str], list[str]]:
    driver.get(f"{url}/docs")
    WebDriverWait(driver, WAIT_S).until(lambda d: len(d.execute_script(RENDERED)) >= len(OPERATIONS))
    rendered = {tuple(operation) for operation in driver.execute_script(RENDERED)}
    requested = [
        message["params"]["request"]["url"]
        for entry in driver.get_log("performance")
        if (message := json.loads(entry["message"])["message"])["method"] == "Network.requestWillBeSent"
    ]
    console = [entry["message"] for entry in driver.get_log("browser")]
    return rendered, requested, driver.execute_script(RESOURCES), console


async def test_the_docs_render_offline_in_a_real_browser(engine: FakeEngine, browser: Any) -> None:  # noqa: F811
    async with uvicorn_serving(engine) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        rendered, requested, resources, console = await asyncio.to_thread(read_the_docs, browser, url)
        page = await client.get("/docs")
        redoc = await client.get("/redoc")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert redoc.status_code == 404  # ReDoc is not served
    assert rendered >= OPERATIONS, rendered
    assert f"{url}/openapi.json" in requested and f"{url}/static/swagger-ui-bundle.js" in requested
    outside = [u for u in [*requested, *resources] if not on_this_machine(u)]
    assert outside == [], outside
    assert not [line for line in console if "Content Security Policy" in line], console
