"""The playground in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by selenium against a real uvicorn with the fake engine, under the page's own CSP.

A missing browser fails these tests rather than skipping them, so CI cannot pass without running them.
The browser is driven from a worker thread: the event loop goes on serving its requests meanwhile."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fakes import FAKE_INFO, FakeEngine, pixel_value, wait_until
from PIL import Image
from test_uvicorn_e2e import uvicorn_serving

from engine.card import read_card, unknown_words
from engine.loading import default_model_dir
from engine.types import Decoder

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # the fixture fails, saying what to install
    webdriver = None

pytestmark = pytest.mark.slow  # a browser start each: a few seconds

APT = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without these Chromium waits on the network at start on a closed machine, or refuses to run as root.
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
PROMPT = "a red circle on a blue background"
SEED, SIZE = 7, (96, 80)  # not the fake's native 64x64, and not square: a swapped width shows
BAD_SIZE = "100x100"  # not a multiple of the fake model's 16 px
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
KEY = "playground-key"
# The screenshot goes to the test's tmp_path, and here too when set (for CI to keep as an artefact).
SCREENSHOT_ENV = "TIUE_PLAYGROUND_SCREENSHOT"
WAIT_S = 30  # a busy CI machine; every wait is for a condition, none is a sleep
_SCRIPT = (Path(__file__).resolve().parents[2] / "service" / "static" / "playground.js").read_text()
MAX_RUNS, HISTORY_BUDGET = (
    int(re.search(rf"const {name} = (\d+);", _SCRIPT).group(1))  # type: ignore[union-attr]
    for name in ("MAX_RUNS", "HISTORY_BUDGET")
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: install the browser and its driver with `{APT}` "
            "(the README's test command does)"
        )
    if webdriver is None:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # every request
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


# The decoded pixels of the first image on the page, through a canvas. A WebDriver script is not bound
# by the page's CSP, but this reads nothing the page itself could not.
READ_PIXELS = """
const img = document.querySelector('#history .grid img');
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext('2d');
context.drawImage(img, 0, 0);
return [img.naturalWidth, img.naturalHeight, Array.from(context.getImageData(0, 0, img.naturalWidth, img.naturalHeight).data)];
"""
IMAGE_SHOWN = (
    "const i = document.querySelector('#history .grid img'); return !!i && i.complete && i.naturalWidth > 0;"
)
RUNS_SHOWN = "return document.querySelectorAll('#history > .run').length;"
UNLABELLED = """
return Array.from(document.querySelectorAll('input, select, textarea'))
  .filter((el) => el.labels.length === 0 && !el.closest('[hidden]')).map((el) => el.id);
"""


def open_page(driver: Any, url: str) -> Any:
    driver.get(f"{url}/")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))  # the script ran
    return wait


def error_shown(driver: Any, wait: Any) -> str:
    text: str = wait.until(ec.visibility_of_element_located((By.ID, "error"))).text
    return text


def ctrl_enter(driver: Any) -> None:
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()


@dataclass
class Seen:
    """What the browser showed, read back out of it."""

    tab_order: list[str]
    unlabelled: list[str]
    error: str
    natural_size: tuple[int, int]
    pixels: np.ndarray  # the page's image as the browser decoded it, RGB
    caption: str
    download: str
    timings: list[str]
    console: list[str]
    phone_overflow: int
    screenshot: bytes
    default_prompt: str
    label: str


def generate_on_the_page(driver: Any, url: str) -> Seen:
    wait = open_page(driver, url)
    unlabelled = driver.execute_script(UNLABELLED)

    # Keyboard only: Tab from the top of the page through the form, type, Ctrl+Enter.
    tab_order: list[str] = []
    while len(tab_order) < 12 and "generate" not in tab_order:
        ActionChains(driver).send_keys(Keys.TAB).perform()
        tab_order.append(driver.switch_to.active_element.get_attribute("id"))
    default_prompt = driver.find_element(By.ID, "prompt").get_attribute("value")
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    size = driver.find_element(By.ID, "size")
    size.send_keys(BAD_SIZE)
    ctrl_enter(driver)
    error = error_shown(driver, wait)

    # A good size, a fixed seed, PNG, and the button.
    size.clear()
    size.send_keys(f"{SIZE[0]}x{SIZE[1]}")
    driver.find_element(By.ID, "seed-random").click()
    driver.find_element(By.ID, "seed").send_keys(str(SEED))
    Select(driver.find_element(By.ID, "format")).select_by_value("png")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.execute_script(IMAGE_SHOWN))
    assert not driver.find_element(By.ID, "error").is_displayed()
    width, height, rgba = driver.execute_script(READ_PIXELS)
    screenshot = driver.get_screenshot_as_png()
    for _ in range(3):  # from the button just clicked, on to the results
        ActionChains(driver).send_keys(Keys.TAB).perform()
        active = driver.switch_to.active_element
        tab_order.append(active.get_attribute("id") or active.get_attribute("download") or active.text)

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth;"
    return Seen(
        tab_order=tab_order,
        unlabelled=unlabelled,
        error=error,
        natural_size=(width, height),
        pixels=np.array(rgba, np.uint8).reshape(height, width, 4)[..., :3],
        caption=driver.find_element(By.CSS_SELECTOR, "#history .grid figcaption").text,
        download=driver.find_element(By.CSS_SELECTOR, "#history .grid a[download]").get_attribute("download"),
        timings=[term.text for term in driver.find_elements(By.CSS_SELECTOR, "#history .timings dt")],
        default_prompt=default_prompt,
        label=driver.find_element(By.CSS_SELECTOR, "#history .run-prompt").text,
        console=[entry["message"] for entry in driver.get_log("browser")],
        phone_overflow=driver.execute_script(overflow),
        screenshot=screenshot,
    )


async def test_the_playground_generates_in_a_real_browser(
    engine: FakeEngine, browser: Any, tmp_path: Path
) -> None:
    width, height = SIZE
    async with (
        uvicorn_serving(engine) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client,
    ):
        seen = await asyncio.to_thread(generate_on_the_page, browser, url)
        same = {"prompt": PROMPT, "seed": SEED, "size": f"{width}x{height}", "output_format": "png"}
        direct = await client.post("/generate", json=same)
        bad = await client.post("/generate", json={"prompt": PROMPT, "size": BAD_SIZE})
    (tmp_path / "playground.png").write_bytes(seen.screenshot)
    if target := os.environ.get(SCREENSHOT_ENV):
        Path(target).write_bytes(seen.screenshot)

    assert not [line for line in seen.console if "Content Security Policy" in line], seen.console
    assert seen.unlabelled == []
    assert seen.tab_order == [
        "prompt",
        "model",
        "n",
        "size",
        "seed-random",
        "format",
        "generate",
        "clear-history",
        f"seed {SEED}",
        f"tiue-{SEED}.png",
    ]

    assert bad.status_code == 422
    assert bad.json()["error"]["message"].lower() in seen.error.lower(), seen.error

    assert seen.natural_size == SIZE
    (item,) = direct.json()["data"]
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
    assert seen.pixels.shape == expected.shape == (height, width, 3)
    assert (seen.pixels == expected).all()
    assert (seen.pixels == pixel_value(SEED)).all()
    assert f"seed {SEED}" in seen.caption and seen.download == f"tiue-{SEED}.png"
    assert seen.label == PROMPT  # the result says what it was asked for
    assert seen.default_prompt and not unknown_words(
        seen.default_prompt, read_card(default_model_dir()).vocabulary
    )
    assert {"denoise", "total"} <= set(seen.timings), seen.timings

    assert seen.phone_overflow <= 0, f"{seen.phone_overflow} px of horizontal scroll at phone width"


def ask_without_then_with_a_key(driver: Any, url: str) -> tuple[str, str | None, bool]:
    wait = open_page(driver, url)
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    ctrl_enter(driver)
    refused = error_shown(driver, wait)
    key = wait.until(ec.visibility_of_element_located((By.ID, "api-key")))
    key.send_keys(KEY)
    ctrl_enter(driver)
    wait.until(lambda d: d.execute_script(IMAGE_SHOWN))
    stored = driver.execute_script("return sessionStorage.getItem('tiue-serve.api-key');")
    open_page(driver, url)  # a reload: the key is still there, the field shown
    kept = driver.find_element(By.ID, "api-key")
    wait.until(
        lambda d: d.find_element(By.ID, "model-note").text.startswith("fake-tiue")
    )  # read with the key
    return refused, stored, kept.is_displayed() and kept.get_attribute("value") == KEY


def refused_when_the_queue_is_full(driver: Any) -> str:
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    driver.find_element(By.ID, "generate").click()
    return error_shown(driver, WebDriverWait(driver, WAIT_S))


async def test_the_playground_asks_for_a_key_and_shows_the_retry_delay(
    engine: FakeEngine, browser: Any
) -> None:
    async with (
        uvicorn_serving(engine, api_keys=[KEY], max_n=1, queue_size=1) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=WAIT_S, headers={"Authorization": f"Bearer {KEY}"}) as client,
    ):
        refused, stored, kept = await asyncio.to_thread(ask_without_then_with_a_key, browser, url)

        engine.gate.clear()  # one request on the device, one queued: the queue is full
        on_device = len(engine.batches) + 1
        held = [asyncio.create_task(client.post("/generate", json={"prompt": PROMPT}))]
        await wait_until(lambda: len(engine.batches) == on_device)
        held.append(asyncio.create_task(client.post("/generate", json={"prompt": PROMPT})))
        await wait_until(lambda: app.state.tiue.batcher.pending_images == 1)  # type: ignore[attr-defined]
        busy = await asyncio.to_thread(refused_when_the_queue_is_full, browser)
        full = await client.post("/generate", json={"prompt": PROMPT})
        engine.gate.set()
        answers = await asyncio.gather(*held)
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]

    assert "API key is required" in refused and "Enter an API key" in refused, refused
    assert stored == KEY and kept
    assert full.status_code == 429
    assert f"Try again in {full.headers['retry-after']} s." in busy, busy


def pick_the_tiny_decoder(driver: Any, url: str) -> tuple[list[str], str, str]:
    wait = open_page(driver, url)
    wait.until(ec.visibility_of_element_located((By.ID, "decoder")))
    select = Select(driver.find_element(By.ID, "decoder"))
    offered, preselected = [o.get_attribute("value") for o in select.options], select.first_selected_option
    chosen = preselected.get_attribute("value")
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    select.select_by_value("tiny")
    ctrl_enter(driver)
    wait.until(lambda d: d.execute_script(IMAGE_SHOWN))
    return offered, chosen, driver.find_element(By.CSS_SELECTOR, "#history .run-meta").text


async def test_the_playground_offers_the_decoders_a_model_has(browser: Any) -> None:
    engine = FakeEngine()
    engine.info = replace(FAKE_INFO, decoders=(Decoder.FULL, Decoder.TINY))
    async with uvicorn_serving(engine) as (url, _):
        offered, preselected, title = await asyncio.to_thread(pick_the_tiny_decoder, browser, url)
    assert offered == ["full", "tiny"] and preselected == "full"
    assert "tiny decoder" in title, title
    assert [r.decoder for r in engine.batches[-1]] == [Decoder.TINY]


@dataclass
class History:
    """Two runs, a reload, a reused seed, a held request, and a copied curl command, as the page showed them."""

    labels_before: list[str]
    labels_after: list[str]
    pixels_after: np.ndarray
    seed_field: tuple[bool, str]
    reused_seeds: list[int]
    elapsed: str
    progress_shown: bool
    curl: str
    warnings: list[str]
    stored_chars: int
    stored_runs: int
    shown_after_fill: int
    cleared: tuple[int, str | None]
    console: list[str]


OTHER_PROMPT = "a green square on a white background"
LAST_PROMPT = "a blue circle on a red background"
STORED = "return [localStorage.getItem('tiue-serve.history').length, JSON.parse(localStorage.getItem('tiue-serve.history')).length];"
# Fill the history as long use would: 20 runs with 0.2 M characters of image each, twice the budget
# (and most of what Chromium allows an origin).
FILL = """
const big = 'A'.repeat(200000);
const runs = Array.from({length: 20}, (_, i) => ({created: i, prompt: `old ${i}`, model: 'fake-tiue', size: '64x64',
  decoder: 'full', output_format: 'png', request: {prompt: `old ${i}`, seed: i}, images: [{seed: i, b64: big}],
  timings: {}, warnings: [], images_dropped: false}));
try { localStorage.setItem('tiue-serve.history', JSON.stringify(runs)); } catch (e) { return String(e); }
return 'stored';
"""


def prompt_and_go(driver: Any, prompt: str) -> None:
    field = driver.find_element(By.ID, "prompt")
    field.clear()
    field.send_keys(prompt)
    ctrl_enter(driver)


def keep_history_and_reuse_a_seed(driver: Any, url: str, engine: FakeEngine) -> History:
    wait = open_page(driver, url)
    labels = "return Array.from(document.querySelectorAll('#history .run-prompt')).map((h) => h.textContent);"
    prompt_and_go(driver, PROMPT)
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 1)
    driver.find_element(By.ID, "n").clear()
    driver.find_element(By.ID, "n").send_keys("2")
    prompt_and_go(driver, f"{OTHER_PROMPT} with a star")
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 2)
    labels_before = driver.execute_script(labels)

    open_page(driver, url)  # a reload: the history is still there, images and all
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 2 and d.execute_script(IMAGE_SHOWN))
    labels_after = driver.execute_script(labels)
    width, height, rgba = driver.execute_script(READ_PIXELS)
    warnings = [w.text for w in driver.find_elements(By.CSS_SELECTOR, "#history .warnings li")]

    # The older run's seed, by keyboard: focus its button, Enter.
    older_seed = driver.find_elements(By.CSS_SELECTOR, "#history > .run:nth-child(2) button.seed-value")[0]
    older_seed.send_keys(Keys.ENTER)
    seed_field = (
        driver.find_element(By.ID, "seed-random").is_selected(),
        driver.find_element(By.ID, "seed").get_attribute("value"),
    )

    # Held on the device: the page counts the seconds.
    engine.gate.clear()
    driver.find_element(By.ID, "n").clear()
    driver.find_element(By.ID, "n").send_keys("1")
    prompt_and_go(driver, PROMPT)
    wait.until(lambda d: float(d.find_element(By.ID, "elapsed").text.split()[0] or 0) >= 0.5)
    progress_shown = driver.find_element(By.ID, "progress").is_displayed()
    elapsed = driver.find_element(By.ID, "elapsed").text
    engine.gate.set()
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 3)
    reused = [
        int(b.text.split()[1])
        for b in driver.find_elements(By.CSS_SELECTOR, "#history > .run:first-child button.seed-value")
    ]

    newest = driver.find_element(By.CSS_SELECTOR, "#history > .run:first-child")
    newest.find_element(By.CSS_SELECTOR, ".copy-curl").click()
    newest.find_element(By.CSS_SELECTOR, ".curl summary").click()
    curl = newest.find_element(By.CSS_SELECTOR, ".curl code").text

    # Storage full of old runs: the next one still lands, and the history stays within its budget.
    filled = driver.execute_script(FILL)
    open_page(driver, url)
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 20)
    prompt_and_go(driver, LAST_PROMPT)
    wait.until(lambda d: d.execute_script(labels)[0] == LAST_PROMPT)
    stored_chars, stored_runs = driver.execute_script(STORED)
    shown_after_fill = driver.execute_script(RUNS_SHOWN)
    assert filled == "stored", filled
    assert not driver.find_element(By.ID, "error").is_displayed()

    driver.find_element(By.ID, "clear-history").click()
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 0)
    cleared = (
        driver.execute_script(RUNS_SHOWN),
        driver.execute_script("return localStorage.getItem('tiue-serve.history');"),
    )
    return History(
        labels_before=labels_before,
        labels_after=labels_after,
        pixels_after=np.array(rgba, np.uint8).reshape(height, width, 4)[..., :3],
        seed_field=seed_field,
        reused_seeds=reused,
        elapsed=elapsed,
        progress_shown=progress_shown,
        curl=curl,
        warnings=warnings,
        stored_chars=stored_chars,
        stored_runs=stored_runs,
        shown_after_fill=shown_after_fill,
        cleared=cleared,
        console=[entry["message"] for entry in driver.get_log("browser")],
    )


async def test_the_history_survives_a_reload_and_a_seed_can_be_reused(browser: Any, tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.info = replace(
        FAKE_INFO, max_prompt_tokens=16, vocabulary=tuple(PROMPT.split()) + tuple(OTHER_PROMPT.split())
    )
    async with uvicorn_serving(engine) as (url, _):
        seen = await asyncio.to_thread(keep_history_and_reuse_a_seed, browser, url, engine)
        async with httpx.AsyncClient(base_url=url) as client:
            icon = await client.get("/favicon.ico")
        older_seed, newest_seed = engine.batches[0][0].seed, engine.batches[1][0].seed
        curl = await asyncio.to_thread(
            subprocess.run,
            seen.curl,
            shell=True,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )

    assert not [line for line in seen.console if "Content Security Policy" in line], seen.console
    assert seen.labels_before == seen.labels_after == [f"{OTHER_PROMPT} with a star", PROMPT]
    assert (seen.pixels_after == pixel_value(newest_seed)).all()  # the newest run's first image, after reload
    assert len(seen.warnings) == 1 and "'star'" in seen.warnings[0], seen.warnings

    assert seen.seed_field == (False, str(older_seed))
    assert seen.reused_seeds == [older_seed] and engine.batches[2][0].seed == older_seed
    assert seen.progress_shown and float(seen.elapsed.split()[0]) >= 0.5, seen.elapsed

    # The copied command makes the same image, and never writes an error into it.
    assert seen.curl.startswith("curl --fail ") and "Authorization" not in seen.curl, seen.curl
    assert curl.returncode == 0, curl.stderr
    made = np.asarray(Image.open(tmp_path / f"tiue-{older_seed}.png").convert("RGB"))
    assert made.shape == (64, 64, 3) and (made == pixel_value(older_seed)).all()

    # 20 old runs of 0.2 M characters and a new one: the oldest went, the rest fit the budget, and the
    # page shows what a reload would.
    assert seen.stored_chars <= HISTORY_BUDGET and 1 < seen.stored_runs < 21, (
        seen.stored_chars,
        seen.stored_runs,
    )
    assert seen.shown_after_fill == seen.stored_runs
    assert seen.cleared == (0, None)

    assert icon.status_code == 200 and icon.headers["content-type"] == "image/vnd.microsoft.icon"
    assert Image.open(io.BytesIO(icon.content)).format == "ICO"


class FlaggingEngine(FakeEngine):
    """Flags every odd seed, as a safety checker would."""

    def generate(self, requests: Any) -> Any:
        result = super().generate(requests)
        for image in result.images:
            image.flagged = image.seed % 2 == 1
        return result


def a_withheld_image_in_the_history(driver: Any, url: str) -> tuple[int, list[str]]:
    wait = open_page(driver, url)
    driver.find_element(By.ID, "n").clear()
    driver.find_element(By.ID, "n").send_keys("2")
    driver.find_element(By.ID, "seed-random").click()
    driver.find_element(By.ID, "seed").send_keys("4")
    prompt_and_go(driver, PROMPT)
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 1)
    open_page(driver, url)  # kept across a reload too
    wait.until(lambda d: d.execute_script(RUNS_SHOWN) == 1 and d.execute_script(IMAGE_SHOWN))
    images = len(driver.find_elements(By.CSS_SELECTOR, "#history .grid img"))
    return images, [note.text for note in driver.find_elements(By.CSS_SELECTOR, "#history .withheld")]


async def test_a_withheld_image_is_a_note_in_its_run(browser: Any) -> None:
    engine = FlaggingEngine()
    engine.info = replace(FAKE_INFO, safety_checker=True)
    async with uvicorn_serving(engine) as (url, _):
        images, notes = await asyncio.to_thread(a_withheld_image_in_the_history, browser, url)
    assert images == 1
    assert notes == ["Image 2 of 2 (seed 5) was withheld: the safety checker flagged it."]
