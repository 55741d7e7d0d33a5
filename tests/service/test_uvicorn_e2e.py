"""End to end over TCP: a real uvicorn on 127.0.0.1 serving the app with a fake engine."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from contextlib import suppress

import httpx
import numpy as np
from fakes import FakeEngine, pixel_value, wait_until
from PIL import Image
from serving import fake_engine_app as uvicorn_serving


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


async def test_eight_concurrent_requests_come_back_right_and_in_batches(engine: FakeEngine) -> None:
    # The device is held on the first batch until all 8 requests have arrived, so the rest must queue
    # behind it and leave in a full batch of 4, whatever the timing of their arrival.
    engine.gate.clear()
    async with (
        uvicorn_serving(engine, max_batch_size=4, max_wait_ms=2000) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        state = app.state.tiue  # type: ignore[attr-defined]
        pending = [
            asyncio.create_task(client.post("/generate", json={"prompt": f"image {i}", "seed": 100 + i}))
            for i in range(8)
        ]
        first = await engine.wait_entered()
        # all arrived: queued, or 4 of them already staged as a full batch behind the first
        await wait_until(lambda: state.batcher.pending_images in (8 - len(first), 4 - len(first)))
        engine.gate.set()
        responses = await asyncio.gather(*pending)
        metrics = (await client.get("/metrics")).text
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        (item,) = response.json()["data"]
        assert item["seed"] == 100 + i
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
        assert (pixels == pixel_value(100 + i)).all()
    batches = metric(metrics, 'tiue_batch_size_images_count{model="fake-tiue"}')
    assert metric(metrics, 'tiue_batch_size_images_sum{model="fake-tiue"}') == 8
    held_one = metric(metrics, 'tiue_batch_size_images_bucket{le="1.0",model="fake-tiue"}')
    held_three = metric(metrics, 'tiue_batch_size_images_bucket{le="3.0",model="fake-tiue"}')
    assert held_one < batches  # some batch held more than 1
    assert held_three < batches  # a full batch of 4, in fact
    assert metric(metrics, 'tiue_images_generated_total{model="fake-tiue"}') == 8
    assert sorted(r.prompt for batch in engine.batches for r in batch) == sorted(
        f"image {i}" for i in range(8)
    )


async def test_a_client_that_hangs_up_over_tcp_is_dropped(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with (
        uvicorn_serving(engine, max_batch_size=1) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        running = asyncio.create_task(client.post("/generate", json={"prompt": "a", "seed": 1}))
        await engine.wait_entered()
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as impatient:
            with suppress(httpx.ReadTimeout):  # the client gives up and closes its connection
                await impatient.post("/generate", json={"prompt": "b", "seed": 2})
        cancelled = app.state.tiue.metrics.rejected.labels(reason="cancelled", model="fake-tiue")  # type: ignore[attr-defined]
        await wait_until(lambda: cancelled._value.get() == 1)
        assert app.state.tiue.batcher.pending_images == 0  # type: ignore[attr-defined]
        engine.gate.set()
        assert (await running).status_code == 200
    assert [r.seed for batch in engine.batches for r in batch] == [1]
