"""The decoder per request over HTTP: a tiny model with a `vae_tiny/` (the real engine), and the fake
engine, which has the full decoder only."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fakes import FakeEngine, make_settings, serve
from PIL import Image

from service.app import create_app

module_loop = pytest.mark.asyncio(loop_scope="module")
pytestmark = (
    pytest.mark.slow
)  # a real model with both decoders: the full suite runs it, the fast loop does not


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_decoder_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(model_dir=tiny_decoder_model_dir, max_batch_size=4, max_wait_ms=50))
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.tiue.ready.wait(), 120)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiue.test") as client:
            yield client


def _pixels(body: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).convert("RGB"))


@module_loop
async def test_each_request_gets_the_decoder_it_names(client: httpx.AsyncClient) -> None:
    full, tiny, default = await asyncio.gather(
        client.post("/generate", json={"prompt": "a red circle", "seed": 3, "decoder": "full"}),
        client.post("/generate", json={"prompt": "a red circle", "seed": 3, "decoder": "tiny"}),
        client.post("/generate", json={"prompt": "a red circle", "seed": 3}),
    )
    assert [r.status_code for r in (full, tiny, default)] == [200, 200, 200], tiny.text
    assert [r.json()["decoder"] for r in (full, tiny, default)] == ["full", "tiny", "full"]
    assert [r.headers["x-decoder"] for r in (full, tiny, default)] == ["full", "tiny", "full"]
    assert np.array_equal(_pixels(full.json()), _pixels(default.json()))
    assert not np.array_equal(_pixels(full.json()), _pixels(tiny.json()))


@module_loop
async def test_raw_bytes_say_their_decoder(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate", json={"prompt": "a red circle", "decoder": "tiny"}, headers={"Accept": "image/png"}
    )
    assert r.status_code == 200 and r.headers["x-decoder"] == "tiny"


@module_loop
async def test_an_unknown_decoder_is_a_422_naming_the_choices(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "a red circle", "decoder": "medium"})
    assert r.status_code == 422
    assert "'full' or 'tiny'" in r.text


@module_loop
async def test_openai_quality_low_is_the_tiny_decoder(client: httpx.AsyncClient) -> None:
    low, high = await asyncio.gather(
        client.post("/v1/images/generations", json={"prompt": "a red circle", "quality": "low", "seed": 1}),
        client.post("/v1/images/generations", json={"prompt": "a red circle", "quality": "high", "seed": 1}),
    )
    assert (low.json()["decoder"], high.json()["decoder"]) == ("tiny", "full")
    assert low.headers["x-decoder"] == "tiny"


@module_loop
async def test_models_list_their_decoders(client: httpx.AsyncClient) -> None:
    (model,) = (await client.get("/v1/models")).json()["data"]
    assert model["decoders"] == ["full", "tiny"] and model["default_decoder"] == "full"


async def test_a_model_without_a_tiny_decoder_refuses_it_by_name() -> None:
    engine = FakeEngine()
    async with serve(engine) as (client, _app):
        r = await client.post("/generate", json={"prompt": "a red circle", "decoder": "tiny"})
        assert r.status_code == 422
        assert r.json()["error"]["param"] == "decoder"
        assert "decoder 'tiny' is not available for model fake-tiue; choose one of: full" in r.text
        low = await client.post("/v1/images/generations", json={"prompt": "a red circle", "quality": "low"})
        assert low.status_code == 200 and low.json()["decoder"] == "full"
    assert engine.batches == [engine.batches[0]] and engine.batches[0][0].decoder.value == "full"
