"""The service with the real engine and a tiny random-init model (tests/conftest.py builds it)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fakes import make_settings
from PIL import Image

pytest.importorskip("engine.pipeline", reason="the engine's pipeline is not in this checkout yet")

from service.app import create_app  # noqa: E402

module_loop = pytest.mark.asyncio(loop_scope="module")  # one app, loaded once, for the async tests


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(model_dir=tiny_model_dir, max_batch_size=4, max_wait_ms=100)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.tiue.ready.wait(), 120)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiue.test") as client:
            yield client


def pixels(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


@module_loop
async def test_images_come_back_with_their_seeds_whatever_batch_they_rode_in(
    client: httpx.AsyncClient,
) -> None:
    together = client.post("/generate", json={"prompt": "a red circle", "n": 3, "seed": 11})
    alone = client.post("/generate", json={"prompt": "a red circle", "seed": 12})
    together_r, alone_r = await asyncio.gather(together, alone)
    assert together_r.status_code == 200, together_r.text
    body = together_r.json()
    assert [item["seed"] for item in body["data"]] == [11, 12, 13]
    images = [pixels(item) for item in body["data"]]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert not np.array_equal(images[0], images[1])
    # seed 12 in a batch with others vs. on its own: the same image (up to one uint8 level of GEMM rounding)
    single = pixels(alone_r.json()["data"][0])
    assert np.abs(single.astype(int) - images[1].astype(int)).max() <= 1


@module_loop
async def test_real_model_reports_stage_timings(client: httpx.AsyncClient) -> None:
    body = (await client.post("/generate", json={"prompt": "a blue square", "seed": 1})).json()
    assert body["model"]
    assert all(
        body["timings"][stage] > 0 for stage in ("text_encode", "denoise", "vae_decode", "image_encode")
    )
    metrics = (await client.get("/metrics")).text
    for stage in ("text_encode", "denoise", "vae_decode", "image_encode"):
        assert re.search(rf'tiue_stage_duration_seconds_count{{model="[^"]+",stage="{stage}"}}', metrics)
    assert "tiue_ready 1.0" in metrics and 'tiue_model_info{backend="torch"' in metrics


def _counter(metrics: str, name: str) -> float:
    (line,) = [m for m in metrics.splitlines() if m.startswith(name + "{")]
    return float(line.split()[-1])


@module_loop
async def test_a_repeated_prompt_is_a_prompt_cache_hit_in_metrics(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    for _ in range(2):
        response = await client.post("/generate", json={"prompt": "a pink heart on the left", "seed": 3})
        assert response.status_code == 200
    after = (await client.get("/metrics")).text
    hits, misses = "tiue_prompt_cache_hits_total", "tiue_prompt_cache_misses_total"
    assert _counter(after, misses) - _counter(before, misses) == 1
    assert _counter(after, hits) - _counter(before, hits) == 1


@module_loop
async def test_raw_png_for_accept_image(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/generate", json={"prompt": "a star", "seed": 5}, headers={"Accept": "image/*"}
    )
    assert response.status_code == 200
    assert response.headers["x-seed"] == "5"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)


@module_loop
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "size": "72x64"}, "width 72 is not supported: it must be a positive multiple of"),
        ({"prompt": "x", "size": "64x2048"}, "height is 2048 px"),
        ({"prompt": "", "n": 1}, "prompt is empty"),
        ({"prompt": "x", "n": 9}, "at most 8 images"),
        ({"prompt": "x", "output_format": "tiff"}, "output_format"),
        ({"prompt": "x", "n": "2"}, "valid integer"),
    ],
)
async def test_bad_inputs_against_the_real_model(
    client: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    response = await client.post("/generate", json=body)
    assert response.status_code == 422
    assert needle in response.json()["error"]["message"]


@module_loop
async def test_prompt_beyond_the_clip_window_is_truncated_and_said_so(client: httpx.AsyncClient) -> None:
    prompt = " ".join(["a small red circle on a blue square"] * 12)  # ~96 words, over 77 tokens
    response = await client.post("/generate", json={"prompt": prompt, "seed": 3})
    assert response.status_code == 200
    (warning,) = response.json()["warnings"]
    assert "the text encoder reads 77" in warning
    assert response.headers["x-warning"] == warning


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_tiue_serve_serves_then_drains_on_sigterm(tiny_model_dir: Path) -> None:
    """The real command in its own process: ready, one image, then SIGTERM ends it cleanly."""
    port = _free_port()
    env = {**os.environ, "TIUE_MODEL_DIR": str(tiny_model_dir), "TIUE_SHUTDOWN_GRACE_S": "5"}
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "not ready after 60 s"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)  # polling a separate process; there is nothing to await
            response = client.post("/generate", json={"prompt": "a red circle", "seed": 1})
            assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal it caught
    assert "Traceback" not in output, output
