"""The safety checker through the service: a tiny checker aimed at known images (tests/support/tiny_safety.py),
the real engine, a real uvicorn on 127.0.0.1, both routes, raw bytes and the official client's stream."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from fakes import make_settings
from serving import uvicorn_app

from service.app import create_app
from tests.support.tiny_safety import CARE_SEED, FLAGGED_SEED, PROMPT, SEEDS

module_loop = pytest.mark.asyncio(loop_scope="module")
pytestmark = pytest.mark.slow  # loads and warms a real (tiny) model with its checker
WITHHELD = "content_policy_violation"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(safety_model_dir: Path) -> AsyncIterator[str]:
    app = create_app(make_settings(model_dir=safety_model_dir, max_batch_size=8, max_wait_ms=50))
    async with uvicorn_app(app) as url:
        yield url


def flagged_total(text: str) -> float:
    match = re.search(r'^tiue_images_flagged_total\{model="[^"]+"\} (\S+)$', text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


async def _post(url: str, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await client.post(path, json=body, headers=headers)


@module_loop
async def test_flagged_images_are_withheld_in_place_counted_and_named(url: str) -> None:
    before = flagged_total((await httpx.AsyncClient().get(f"{url}/metrics")).text)
    body = {"prompt": PROMPT, "n": len(SEEDS), "seed": SEEDS[0]}
    response = await _post(url, "/generate", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    withheld = {item["seed"] for item in answer["data"] if item["withheld"] == WITHHELD}
    assert withheld == {FLAGGED_SEED, CARE_SEED}
    for item in answer["data"]:
        assert (item["b64_json"] is None) == (item["seed"] in withheld)
    assert [w for w in answer["warnings"] if "withheld" in w] == [
        f"image {seed - SEEDS[0]} (seed {seed}) was withheld: the safety checker flagged it"
        for seed in sorted(withheld)
    ]
    assert answer["timings"]["safety_check"] > 0
    after = flagged_total((await httpx.AsyncClient().get(f"{url}/metrics")).text)
    assert after - before == 2


@module_loop
async def test_moderation_low_lets_the_special_care_image_through(url: str) -> None:
    body = {"prompt": PROMPT, "n": len(SEEDS), "seed": SEEDS[0], "moderation": "low"}
    response = await _post(url, "/v1/images/generations", body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["seed"] for item in data if item["withheld"]] == [FLAGGED_SEED]
    assert data[CARE_SEED - SEEDS[0]]["b64_json"]


@module_loop
@pytest.mark.parametrize("route", ["/generate", "/v1/images/generations"])
async def test_a_request_whose_every_image_is_flagged_is_a_content_policy_violation(
    url: str, route: str
) -> None:
    response = await _post(url, route, {"prompt": PROMPT, "seed": FLAGGED_SEED})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == WITHHELD


@module_loop
async def test_raw_bytes_of_a_flagged_image_are_a_json_content_policy_violation(url: str) -> None:
    response = await _post(url, "/generate", {"prompt": PROMPT, "seed": FLAGGED_SEED}, accept="image/png")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == WITHHELD
    shown = await _post(url, "/generate", {"prompt": PROMPT, "seed": SEEDS[0]}, accept="image/png")
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"


@module_loop
async def test_the_stream_sends_the_images_not_withheld_and_an_error_when_none_is_left(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await client.images.generate(
        prompt=PROMPT, n=len(SEEDS), stream=True, extra_body={"seed": SEEDS[0]}
    )
    events = [event async for event in stream]
    seeds = [(event.model_extra or {})["seed"] for event in events]
    assert seeds == [seed for seed in SEEDS if seed not in (FLAGGED_SEED, CARE_SEED)]
    assert any("withheld" in warning for warning in (events[0].model_extra or {})["warnings"])
    stream = await client.images.generate(prompt=PROMPT, stream=True, extra_body={"seed": FLAGGED_SEED})
    with pytest.raises(openai.APIError, match="flagged by the safety checker") as refused:
        _ = [event async for event in stream]
    assert refused.value.code == WITHHELD
