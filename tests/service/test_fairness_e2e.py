"""Cost-based admission and fair queueing end to end: a real uvicorn on 127.0.0.1, a fake engine whose
device time grows with the image's area, two clients told apart by their API keys."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import httpx
from fakes import FakeEngine
from test_uvicorn_e2e import uvicorn_serving

from engine.types import BatchResult, GenerationRequest

BASE_S = 0.04  # device seconds for one 64x64 image


class AreaEngine(FakeEngine):
    """Device time proportional to the pixels made, as a convolutional model's roughly is."""

    def generate(self, requests: Sequence[GenerationRequest]) -> BatchResult:
        threading.Event().wait(BASE_S * sum(r.width * r.height for r in requests) / 64**2)
        return super().generate(requests)


def key(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}"}


async def test_a_small_request_is_not_stuck_behind_another_clients_giant_one() -> None:
    engine = AreaEngine()
    settings = {"api_keys": "giant,small", "max_batch_size": 4, "max_wait_ms": 0, "max_n": 8}
    async with (
        uvicorn_serving(engine, **settings) as (url, _app),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        # Teach the cost model the large size first (one image), as a warm server would know it.
        warm = await client.post("/generate", json={"prompt": "w", "size": "128x128"}, headers=key("giant"))
        assert warm.status_code == 200, warm.text
        engine.batches.clear()
        started = time.monotonic()
        giant = asyncio.create_task(
            client.post(
                "/generate", json={"prompt": "g", "n": 8, "size": "128x128", "seed": 0}, headers=key("giant")
            )
        )
        await asyncio.sleep(0.05)  # the giant's first batch is on the device
        small = await client.post("/generate", json={"prompt": "s", "seed": 100}, headers=key("small"))
        small_s = time.monotonic() - started
        giant_response = await giant
        giant_s = time.monotonic() - started
    assert small.status_code == 200 and giant_response.status_code == 200
    # The giant is two batches of 4 x 128x128 (~0.64 s each); the small one rides between them.
    assert [[r.seed for r in batch] for batch in engine.batches] == [[0, 1, 2, 3], [100], [4, 5, 6, 7]]
    assert small_s < 0.64 * 1.5 + 0.1 < giant_s


async def test_a_request_dearer_than_the_limit_is_refused_before_it_queues() -> None:
    engine = AreaEngine()
    async with (
        uvicorn_serving(engine, max_batch_size=4, max_wait_ms=0, max_n=8, max_request_s=1.0) as (url, _app),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        warm = await client.post("/generate", json={"prompt": "w", "size": "128x128"})
        assert warm.status_code == 200
        engine.batches.clear()
        started = time.monotonic()
        refused = await client.post("/generate", json={"prompt": "g", "n": 8, "size": "128x128"})
        assert time.monotonic() - started < 0.2
        fits = await client.post("/generate", json={"prompt": "g", "n": 2, "size": "128x128"})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_costly" and "allows 1 s per request" in error["message"]
    assert "at most 6 images at 128x128" in error["message"]
    assert fits.status_code == 200
    assert [len(batch) for batch in engine.batches] == [2]  # the refused request never reached the device


async def test_the_timeout_counts_from_arrival_and_hopeless_requests_are_refused_at_once() -> None:
    engine = AreaEngine()
    settings = {"max_batch_size": 4, "max_wait_ms": 0, "request_timeout_s": 1.0, "client_share": 1.0}
    async with (
        uvicorn_serving(engine, **settings) as (url, _app),
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        warm = await client.post("/generate", json={"prompt": "w", "size": "128x128"})
        assert warm.status_code == 200
        busy = [
            asyncio.create_task(client.post("/generate", json={"prompt": "b", "n": 4, "size": "128x128"}))
            for _ in range(2)
        ]  # ~1.3 s of device work from one client
        await asyncio.sleep(0.05)
        started = time.monotonic()
        late = await client.post("/generate", json={"prompt": "l", "n": 4, "size": "128x128"})
        elapsed = time.monotonic() - started
        answers = await asyncio.gather(*busy)
    assert late.status_code == 429 and elapsed < 0.2, late.text  # at once, not a 504 a second later
    assert int(late.headers["retry-after"]) >= 1 and late.json()["error"]["code"] == "queue_full"
    assert sorted(r.status_code for r in answers) in ([200, 200], [200, 429])
