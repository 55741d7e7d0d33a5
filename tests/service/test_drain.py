"""Shutdown: readiness drops and admission stops at once; queued work finishes within the grace period."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import httpx
from fakes import FakeEngine, make_settings, wait_until

from service.app import create_app
from service.state import Phase

GOOD = {"prompt": "a red circle"}


async def start(engine: FakeEngine, **settings: object) -> tuple[AsyncExitStack, httpx.AsyncClient, object]:
    app = create_app(make_settings(max_batch_size=1, **settings), pipeline_factory=lambda: engine)
    stack = AsyncExitStack()
    await stack.enter_async_context(app.router.lifespan_context(app))
    await asyncio.wait_for(app.state.tiue.ready.wait(), 5)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tiue.test")
    return stack, client, app


async def test_drain_turns_readiness_off_refuses_new_work_and_finishes_queued_work(
    engine: FakeEngine,
) -> None:
    engine.gate.clear()
    stack, client, app = await start(engine, shutdown_grace_s=30)
    state = app.state.tiue  # type: ignore[attr-defined]
    async with client:
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()
        queued = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 2}))
        await wait_until(lambda: state.batcher.pending_images == 1)

        state.begin_drain()  # what SIGTERM does (service.cli hooks it into uvicorn's signal handler)
        ready = await client.get("/readyz")
        refused = await client.post("/generate", json=GOOD)
        openai_refused = await client.post("/v1/images/generations", json=GOOD)
        metrics = (await client.get("/metrics")).text
        live = await client.get("/livez")

        closing = asyncio.create_task(stack.aclose())  # uvicorn's lifespan shutdown
        await asyncio.sleep(0.05)
        assert not closing.done()  # waits for the queued request
        engine.gate.set()
        await asyncio.wait_for(closing, 5)
        assert (await running).status_code == 200
        assert (await queued).status_code == 200

    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert openai_refused.status_code == 503
    assert "tiue_ready 0.0" in metrics
    assert live.status_code == 200
    assert [r.seed for batch in engine.batches for r in batch] == [1, 2]


async def test_work_left_when_the_grace_period_ends_gets_503(engine: FakeEngine) -> None:
    engine.gate.clear()
    stack, client, app = await start(engine, shutdown_grace_s=0.2)
    async with client:
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()
        queued = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 2}))
        await wait_until(lambda: app.state.tiue.batcher.pending_images == 1)  # type: ignore[attr-defined]
        started = time.monotonic()
        await asyncio.wait_for(stack.aclose(), 5)
        assert time.monotonic() - started < 2
        responses = await asyncio.gather(running, queued)
    engine.gate.set()
    assert [r.status_code for r in responses] == [503, 503]
    assert all("shut down" in r.json()["error"]["message"] for r in responses)
    assert [r.seed for batch in engine.batches for r in batch] == [1]


async def test_shutdown_during_model_load_does_not_wait_for_the_load() -> None:
    engine = FakeEngine()
    loading = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_factory() -> FakeEngine:
        loop.call_soon_threadsafe(loading.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        return engine

    app = create_app(make_settings(), pipeline_factory=slow_factory)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        await asyncio.wait_for(loading.wait(), 5)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/livez")).status_code == 200  # the loop answers during the load
            not_ready = await client.get("/readyz")
            refused = await client.post("/generate", json=GOOD)
    release.set()
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "loading"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert app.state.tiue.phase is Phase.DRAINING


async def test_a_failed_load_is_reported_and_not_ready() -> None:
    failures: list[BaseException] = []

    def broken() -> FakeEngine:
        raise FileNotFoundError("no model_index.json in /models/nowhere")

    app = create_app(make_settings(), pipeline_factory=broken, on_fatal=failures.append)
    async with app.router.lifespan_context(app):
        await wait_until(lambda: app.state.tiue.phase is Phase.FAILED)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ready = await client.get("/readyz")
            refused = await client.post("/generate", json=GOOD)
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "failed",
        "queued_images": 0,
        "queued_seconds": 0.0,
        "models": {},  # the one model is named by its pipeline, which never loaded
        "detail": "FileNotFoundError: no model_index.json in /models/nowhere",
    }
    assert refused.status_code == 503 and "failed to load" in refused.json()["error"]["message"]
    assert len(failures) == 1 and isinstance(failures[0], FileNotFoundError)
