"""OpenAI image streaming over TCP: the official client's stream iterator against a real uvicorn on
127.0.0.1 serving the app with a fake engine."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from fakes import FakeEngine, pixel_value, wait_until
from openai.types import ImageGenCompletedEvent
from PIL import Image
from serving import fake_engine_app as serving

from service.streaming import PARTIAL_IMAGES_WARNING


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


async def test_the_official_client_streams_one_completed_event_per_image(engine: FakeEngine) -> None:
    async with serving(engine) as (url, _app):
        stream = await sdk(url).images.generate(
            prompt="a red circle",
            n=2,
            size="96x64",
            output_format="webp",
            stream=True,
            extra_body={"seed": 7},
        )
        events = [event async for event in stream]
        assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert [type(event) for event in events] == [ImageGenCompletedEvent] * 2
    for event, seed in zip(events, (7, 8), strict=True):
        assert isinstance(event, ImageGenCompletedEvent)
        assert event.type == "image_generation.completed"
        assert (event.size, event.output_format, event.background, event.quality) == (
            "96x64",
            "webp",
            "auto",
            "auto",
        )
        image = pixels(event.b64_json)
        assert image.shape == (64, 96, 3) and (image == pixel_value(seed)).all()
        tokens = engine.count_tokens("a red circle")
        assert event.usage.input_tokens == event.usage.total_tokens == tokens
        assert event.usage.input_tokens_details.text_tokens == tokens
        assert event.usage.output_tokens == 0 and event.usage.input_tokens_details.image_tokens == 0
        extra = event.model_extra or {}
        assert extra["seed"] == seed and extra["warnings"] == []


async def test_partial_images_are_answered_with_completed_events_and_a_warning(engine: FakeEngine) -> None:
    async with serving(engine) as (url, _app):
        stream = await sdk(url).images.generate(prompt="a red circle", stream=True, partial_images=2)
        events = [event async for event in stream]
        assert PARTIAL_IMAGES_WARNING in stream.response.headers["x-warning"]
    assert [event.type for event in events] == ["image_generation.completed"]
    assert (events[0].model_extra or {})["warnings"] == [PARTIAL_IMAGES_WARNING]


async def test_a_failure_after_the_stream_began_is_its_error_event() -> None:
    engine = FakeEngine(fail=lambda batch: True)
    async with serving(engine) as (url, _app):
        stream = await sdk(url).images.generate(prompt="a red circle", stream=True)
        assert stream.response.status_code == 200
        with pytest.raises(openai.APIError, match="image generation failed") as failed:
            _ = [event async for event in stream]
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "server_error" and body["request_id"]


async def test_refusals_before_the_stream_stay_json_errors(engine: FakeEngine) -> None:
    async with serving(engine, rate_limit_per_minute=1, rate_limit_burst=1) as (url, _app):
        client = sdk(url)
        with pytest.raises(openai.UnprocessableEntityError, match="multiple of 16"):
            await client.images.generate(prompt="a red circle", size="72x64", stream=True)  # type: ignore[arg-type]
        stream = await client.images.generate(prompt="a red circle", stream=True)
        assert len([event async for event in stream]) == 1
        with pytest.raises(openai.RateLimitError) as limited:
            await client.images.generate(prompt="a red circle", stream=True)
    assert limited.value.response.headers["content-type"] == "application/json"
    assert limited.value.code == "rate_limited"


async def test_a_client_that_hangs_up_mid_stream_cancels_its_queued_work(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with (
        serving(engine, max_batch_size=1) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        state = app.state.tiue
        running = asyncio.create_task(client.post("/generate", json={"prompt": "a", "seed": 1}))
        await engine.wait_entered()
        body = {"prompt": "b", "seed": 2, "stream": True}
        async with client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200  # the stream has begun; its image is queued
            assert response.headers["content-type"].startswith("text/event-stream")
            await wait_until(lambda: state.batcher.pending_images == 1)
        # hung up: the queued image is dropped before it reaches the device, counted as cancelled
        await wait_until(lambda: state.batcher.pending_images == 0)
        cancelled = state.metrics.rejected.labels(reason="cancelled", model="fake-tiue")
        await wait_until(lambda: cancelled._value.get() == 1)
        engine.gate.set()
        assert (await running).status_code == 200
        stream = await sdk(url).images.generate(prompt="c", stream=True, extra_body={"seed": 3})
        assert len([event async for event in stream]) == 1  # and the server serves on
        await wait_until(lambda: state.metrics.in_flight._value.get() == 0)
    assert [r.seed for batch in engine.batches for r in batch] == [1, 3]


async def test_moderation_without_a_safety_checker_is_a_warning(engine: FakeEngine) -> None:
    async with serving(engine) as (url, _app):
        made = await sdk(url).images.generate(prompt="a red circle", moderation="low")
        async with httpx.AsyncClient(base_url=url) as client:
            generated = await client.post("/generate", json={"prompt": "a", "moderation": "auto"})
    warning = "moderation 'low' was ignored: model fake-tiue runs no safety checker"
    assert (made.model_extra or {})["warnings"] == [warning]
    assert generated.json()["warnings"] == [warning.replace("'low'", "'auto'")]
