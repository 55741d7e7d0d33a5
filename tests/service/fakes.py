"""Test helpers: a fake engine (deterministic images, a gate to hold the device) and a served app."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from engine.errors import UnsupportedSizeError
from engine.types import BatchResult, GeneratedImage, GenerationRequest, ModelInfo
from service.app import create_app
from service.settings import Settings

FAKE_INFO = ModelInfo(
    name="fake-tiue",
    backend="torch",
    precision="fp32",
    device="cpu",
    steps=4,
    max_prompt_tokens=8,
    size_multiple=16,
    default_size=64,
)


def pixel_value(seed: int) -> int:
    """The fake engine paints image `seed` in one grey level, so a test can tell which seed it got."""
    return seed % 251


class FakeEngine:
    """Implements service.protocol.Pipeline without a model. Thread-safe where the device thread needs it."""

    def __init__(self, *, fail: Callable[[Sequence[GenerationRequest]], bool] | None = None):
        self.info = FAKE_INFO
        self.batches: list[list[GenerationRequest]] = []
        self.entered: queue.Queue[list[GenerationRequest]] = queue.Queue()  # one entry per generate() call
        self.gate = threading.Event()  # generate() waits on it; set = run freely
        self.gate.set()
        self.fail = fail
        self.warmed = False
        self.compute_s = 0.0

    def validate(self, request: GenerationRequest) -> None:
        for name, value in (("width", request.width), ("height", request.height)):
            if value % self.info.size_multiple:
                raise UnsupportedSizeError(f"{name} {value} is not a multiple of {self.info.size_multiple}")

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split()) + 2  # words plus BOS/EOS

    def generate(self, requests: Sequence[GenerationRequest]) -> BatchResult:
        batch = list(requests)
        self.batches.append(batch)
        self.entered.put(batch)
        self.gate.wait(timeout=10)
        if self.compute_s:
            threading.Event().wait(self.compute_s)  # stands in for device time
        if self.fail is not None and self.fail(batch):
            raise RuntimeError("the fake device caught fire")
        images = [
            GeneratedImage(np.full((r.height, r.width, 3), pixel_value(r.seed), np.uint8), r.seed)
            for r in batch
        ]
        return BatchResult(images, {"text_encode": 0.001, "denoise": 0.004, "vae_decode": 0.002})

    def warmup(self, batch_sizes: Any = None, sizes: Any = None) -> None:
        self.warmed = True

    async def wait_entered(self, timeout: float = 5.0) -> list[GenerationRequest]:
        """The next batch to reach the device (blocks a worker thread of the default pool, not the loop)."""
        return await asyncio.to_thread(self.entered.get, True, timeout)


def make_settings(**overrides: Any) -> Settings:
    # event_loop_nice 0: a server in the test process must not lower the priority of pytest's own thread.
    defaults: dict[str, Any] = {
        "max_wait_ms": 5,
        "encode_threads": 2,
        "shutdown_grace_s": 5,
        "event_loop_nice": 0,
    }
    return Settings(**{**defaults, **overrides})


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[FastAPI]:
    """Run the app's lifespan (ASGITransport does not) and wait until it is ready."""
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.tiue.ready.wait(), timeout=30)
        yield app


@asynccontextmanager
async def serve(engine: Any, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(make_settings(**settings), pipeline_factory=lambda: engine)
    try:
        async with running(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tiue.test") as client:
                yield client, app
    finally:
        if isinstance(engine, FakeEngine):
            engine.gate.set()  # never leave the device thread blocked


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition the test cannot await directly (state inside the app)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)
