"""Several models on one device, over TCP (a real uvicorn on 127.0.0.1): two different tiny random-init
models (SD1.5- and SD2.1-shaped, sharing a byte-identical vae/), and two fake engines for the batching."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import pytest_asyncio
from fakes import FAKE_INFO, FakeEngine, make_settings, pixel_value, wait_until
from PIL import Image
from serving import uvicorn_app

from service.app import create_app
from service.cli import main as tiue
from tests.support.tiny_model import build_tiny_pipeline

pytestmark = pytest.mark.slow  # real models in real servers: the full suite runs them, the fast loop does not

module_loop = pytest.mark.asyncio(loop_scope="module")  # one server, both models loaded once
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sd15: the session's tiny SD1.5-shaped model; sd21: an SD2.1-shaped one with other weights, whose
    vae/ is a byte-for-byte copy of sd15's (so the server loads that VAE once)."""
    sd21 = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd21-shared-vae"), "sd21", seed=1)
    shutil.rmtree(sd21 / "vae")
    shutil.copytree(tiny_model_dir / "vae", sd21 / "vae")
    return {"sd15": tiny_model_dir, "sd21": sd21}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(model_dirs: dict[str, Path]) -> AsyncIterator[tuple[str, Any]]:
    settings = make_settings(models=model_dirs, max_batch_size=4, max_wait_ms=300)
    app = create_app(settings)
    async with uvicorn_app(app) as url:
        yield url, app


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


@module_loop
async def test_the_openai_client_lists_and_retrieves_the_models(server: tuple[str, Any]) -> None:
    url, _app = server
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    listed = [model async for model in client.models.list()]
    assert [model.id for model in listed] == ["sd15", "sd21"]
    assert all(model.object == "model" and model.owned_by == "tiue-serve" for model in listed)
    one = await client.models.retrieve("sd21")
    assert one.id == "sd21" and isinstance(one.created, int)
    extra = one.model_extra or {}
    assert extra["native_size"] == "64x64" and extra["steps"] == 4 and extra["default"] is False
    assert extra["backend"] == "torch" and extra["precision"] == "fp32"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("dall-e-3")
    assert "sd15, sd21" in str(missing.value)


@module_loop
async def test_each_model_makes_the_image_tiue_generate_makes_with_its_folder(
    server: tuple[str, Any], model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    url, _app = server
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        made = {
            name: (await client.post("/generate", json={"model": name, "prompt": PROMPT, "seed": 5})).json()
            for name in model_dirs
        }
        default = (await client.post("/generate", json={"prompt": PROMPT, "seed": 5})).json()
        openai_route = await client.post(
            "/v1/images/generations", json={"model": "sd21", "prompt": PROMPT, "seed": 5}
        )
    assert {name: body["model"] for name, body in made.items()} == {"sd15": "sd15", "sd21": "sd21"}
    assert default["model"] == "sd15"  # the first configured
    assert openai_route.json()["model"] == "sd21"
    for name, folder in model_dirs.items():
        out = tmp_path / f"{name}.png"
        argv = ["generate", PROMPT, "--seed", "5", "--model", str(folder), "--out", str(out)]
        assert await asyncio.to_thread(tiue, argv) == 0
        alone = np.asarray(Image.open(out).convert("RGB"))
        assert np.array_equal(pixels(made[name]["data"][0]["b64_json"]), alone), name
    assert np.array_equal(pixels(default["data"][0]["b64_json"]), pixels(made["sd15"]["data"][0]["b64_json"]))
    assert np.array_equal(
        pixels(openai_route.json()["data"][0]["b64_json"]), pixels(made["sd21"]["data"][0]["b64_json"])
    )
    assert not np.array_equal(
        pixels(made["sd15"]["data"][0]["b64_json"]), pixels(made["sd21"]["data"][0]["b64_json"])
    )


@module_loop
async def test_interleaved_requests_for_both_models_come_back_right(server: tuple[str, Any]) -> None:
    url, _app = server
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        before = (await client.get("/metrics")).text
        names = ["sd15", "sd21"] * 4
        bodies = [{"model": name, "prompt": PROMPT, "seed": 100 + i} for i, name in enumerate(names)]
        together = await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))
        alone = [await client.post("/generate", json=body) for body in bodies]
        after = (await client.get("/metrics")).text
    for body, mixed, single in zip(bodies, together, alone, strict=True):
        assert mixed.status_code == 200 and mixed.json()["model"] == body["model"]
        # the same image as on its own, up to one uint8 level of GEMM rounding between batch sizes
        difference = pixels(mixed.json()["data"][0]["b64_json"]).astype(int) - pixels(
            single.json()["data"][0]["b64_json"]
        )
        assert np.abs(difference).max() <= 1
    for name in ("sd15", "sd21"):
        images = f'tiue_images_generated_total{{model="{name}"}}'
        assert sample(after, images) - sample(before, images) == 8
        batches = f'tiue_batch_size_images_count{{model="{name}"}}'
        assert sample(after, batches) - sample(before, batches) < 8  # 4 concurrent, 4 alone: some shared


@module_loop
async def test_an_unknown_model_is_404_and_never_a_label(server: tuple[str, Any]) -> None:
    url, _app = server
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        before = (await client.get("/metrics")).text
        refused = await client.post("/generate", json={"model": "sd3-ultra", "prompt": PROMPT})
        openai_refused = await client.post("/v1/images/generations", json={"model": "x", "prompt": PROMPT})
        metrics = (await client.get("/metrics")).text
        ready = (await client.get("/readyz")).json()
    assert refused.status_code == 404 and openai_refused.status_code == 404
    error = refused.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'sd3-ultra'" in error["message"] and "sd15, sd21" in error["message"]
    assert "sd3-ultra" not in metrics
    not_found = 'tiue_requests_rejected_total{model="",reason="model_not_found"}'
    assert sample(metrics, not_found) - sample(before, not_found) == 2
    for name in ("sd15", "sd21"):
        assert (
            f'tiue_model_info{{backend="torch",device="cpu",model="{name}",precision="fp32"}} 1.0' in metrics
        )
    assert ready["status"] == "ready" and ready["model"] == "sd15"
    assert ready["models"] == {"sd15": "ready", "sd21": "ready"}


@module_loop
async def test_a_byte_identical_vae_is_one_module(server: tuple[str, Any]) -> None:
    _url, app = server
    sd15, sd21 = (model.pipeline for model in app.state.tiue.models)
    assert sd15.components.vae is sd21.components.vae
    assert sd15.components.unet is not sd21.components.unet
    assert sd15.components.text_encoder is not sd21.components.text_encoder


# -- batching across models, deterministic with fake engines ------------------------------------------


async def test_a_batch_holds_one_model_and_the_oldest_ready_batch_goes_first() -> None:
    small, large = FakeEngine(), FakeEngine()
    large.info = replace(FAKE_INFO, name="large", default_size=128)
    order: list[tuple[str, list[int]]] = []  # batches as they reach the one device, both models
    for name, engine in (("small", small), ("large", large)):
        engine.generate = _recording(engine, name, order)  # type: ignore[method-assign]
    small.gate.clear()
    settings = make_settings(max_batch_size=4, max_wait_ms=2000, default_model="large")
    app = create_app(settings, pipeline_factories={"small": lambda: small, "large": lambda: large})
    async with uvicorn_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        first = asyncio.create_task(
            client.post("/generate", json={"model": "small", "prompt": "p", "seed": 0})
        )
        await small.wait_entered()  # the device is held: everything else queues behind it
        names = ["small", "large"] * 4
        pending = []
        for i, name in enumerate(names):  # one at a time into the queue, so their order is known
            body = {"model": name, "prompt": "p", "seed": 1 + i}
            pending.append(asyncio.create_task(client.post("/generate", json=body)))
            await wait_until(lambda i=i: app.state.tiue.batcher.pending_images == i + 1)
        default = asyncio.create_task(client.post("/generate", json={"prompt": "p", "seed": 50}))
        small.gate.set()
        responses = await asyncio.gather(first, *pending, default)
    assert all(response.status_code == 200 for response in responses)
    for response, name in zip(responses[1:-1], names, strict=True):
        body = response.json()
        assert body["model"] == name and body["size"] == ("64x64" if name == "small" else "128x128")
        assert (pixels(body["data"][0]["b64_json"]) == pixel_value(body["data"][0]["seed"])).all()
    assert responses[-1].json()["model"] == "large"
    assert [(name, sorted(seeds)) for name, seeds in order] == [
        ("small", [0]),
        ("small", [1, 3, 5, 7]),  # its oldest request came first: its batch goes first
        ("large", [2, 4, 6, 8]),
        ("large", [50]),  # the default model's, which arrived last
    ]


def _recording(engine: FakeEngine, name: str, order: list[tuple[str, list[int]]]) -> Any:
    generate = engine.generate

    def record(requests: Any) -> Any:
        order.append((name, [r.seed for r in requests]))
        return generate(requests)

    return record


async def test_a_model_that_fails_to_load_fails_the_start_by_name() -> None:
    failures: list[BaseException] = []

    def broken() -> FakeEngine:
        raise FileNotFoundError("no model_index.json in /models/nowhere")

    app = create_app(
        make_settings(),
        pipeline_factories={"good": FakeEngine, "bad": broken},
        on_fatal=failures.append,
    )
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(_failed(app), 10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ready = await client.get("/readyz")
            models = await client.get("/v1/models")
    assert ready.status_code == 503 and models.status_code == 503
    assert ready.json()["detail"] == "bad: FileNotFoundError: no model_index.json in /models/nowhere"
    assert ready.json()["models"] == {"good": "ready", "bad": "failed"}
    assert len(failures) == 1


async def _failed(app: Any) -> None:
    while app.state.tiue.failure is None:
        await asyncio.sleep(0.01)
