"""The HTTP API over ASGI (httpx, no sockets) with a fake engine: answers, every bad input, limits."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from typing import Any

import httpx
import numpy as np
import pytest
from fakes import FakeEngine, pixel_value, serve, wait_until
from PIL import Image

GOOD = {"prompt": "a red circle", "seed": 7}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_b64(text: str) -> np.ndarray:
    return decode(base64.b64decode(text))


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["message"], body
    return error


# -- the good path ------------------------------------------------------------------------------


async def test_generate_returns_one_image_per_seed_in_order(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post(
            "/generate", json={"prompt": "a cat", "n": 3, "seed": 40, "size": "96x64"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "fake-tiue" and body["size"] == "96x64" and body["output_format"] == "png"
    assert [item["seed"] for item in body["data"]] == [40, 41, 42]
    for item in body["data"]:
        pixels = decode_b64(item["b64_json"])
        assert pixels.shape == (64, 96, 3)
        assert (pixels == pixel_value(item["seed"])).all()
    assert body["warnings"] == []
    assert set(body["timings"]) == {
        "queue_wait",
        "text_encode",
        "denoise",
        "vae_decode",
        "safety_check",
        "image_encode",
        "total",
    }
    assert body["timings"]["denoise"] == pytest.approx(0.004)
    assert "denoise;dur=4.0" in response.headers["server-timing"]


async def test_n_larger_than_a_batch_is_split_over_batches_and_returned_in_order(engine: FakeEngine) -> None:
    async with serve(engine, max_batch_size=3) as (client, _app):
        response = await client.post("/generate", json={"prompt": "x", "n": 8, "seed": 20})
    assert [item["seed"] for item in response.json()["data"]] == list(range(20, 28))
    assert [len(batch) for batch in engine.batches] == [3, 3, 2]


async def test_width_and_height_may_replace_size_and_default_is_the_models_size(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        explicit = await client.post("/generate", json={**GOOD, "width": 96, "height": 64})
        default = await client.post("/generate", json=GOOD)
    assert explicit.json()["size"] == "96x64"
    assert default.json()["size"] == "64x64"


async def test_a_random_seed_is_returned_and_reproduces_the_image(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        first = (await client.post("/generate", json={"prompt": "a cat"})).json()["data"][0]
        again = (await client.post("/generate", json={"prompt": "a cat", "seed": first["seed"]})).json()[
            "data"
        ][0]
    assert 0 <= first["seed"] < 2**32
    assert first["b64_json"] == again["b64_json"]


async def test_seeds_wrap_at_2_to_the_32(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        body = (await client.post("/generate", json={"prompt": "x", "n": 2, "seed": 2**32 - 1})).json()
    assert [item["seed"] for item in body["data"]] == [2**32 - 1, 0]


@pytest.mark.parametrize(
    ("output_format", "magic"), [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")]
)
async def test_output_formats(engine: FakeEngine, output_format: str, magic: bytes) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", json={**GOOD, "output_format": output_format})
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert data.startswith(magic)


@pytest.mark.parametrize(
    ("accept", "body", "media_type"),
    [
        ("image/*", GOOD, "image/png"),
        ("image/*", {**GOOD, "output_format": "webp"}, "image/webp"),
        ("image/jpeg", GOOD, "image/jpeg"),
        ("application/json;q=0.5, image/webp", GOOD, "image/webp"),
    ],
)
async def test_accept_image_returns_raw_bytes_with_the_seed_in_a_header(
    engine: FakeEngine, accept: str, body: dict[str, Any], media_type: str
) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", json=body, headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert response.headers["x-seed"] == "7"
    assert (decode(response.content) == pixel_value(7)).all() or media_type == "image/jpeg"


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "image/png;q=0.5, application/json"])
async def test_json_unless_an_image_type_is_preferred(engine: FakeEngine, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", json=GOOD, headers=headers)
    assert response.headers["content-type"] == "application/json"


async def test_raw_bytes_cannot_carry_several_images(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", json={**GOOD, "n": 2}, headers={"Accept": "image/*"})
    assert response.status_code == 406
    assert "n is 2" in error_of(response)["message"]


async def test_accept_and_output_format_must_agree(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        body = {**GOOD, "output_format": "jpeg"}
        response = await client.post("/generate", json=body, headers={"Accept": "image/png"})
    assert response.status_code == 406
    assert error_of(response)["param"] == "output_format"


# -- OpenAI's images API --------------------------------------------------------------------------


async def test_openai_route_speaks_openais_shape(engine: FakeEngine) -> None:
    request = {
        "model": "fake-tiue",
        "prompt": "a red circle",
        "n": 2,
        "size": "64x64",
        "response_format": "b64_json",
        "quality": "hd",
        "style": "vivid",
        "user": "someone",
        "some_future_field": True,
    }
    async with serve(engine) as (client, _app):
        response = await client.post("/v1/images/generations", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and body["model"] == "fake-tiue"
    assert len(body["data"]) == 2
    assert all(decode_b64(item["b64_json"]).shape == (64, 64, 3) for item in body["data"])


async def test_openai_size_auto_and_defaults(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        body = (await client.post("/v1/images/generations", json={"prompt": "x", "size": "auto"})).json()
    assert body["size"] == "64x64" and body["output_format"] == "png" and len(body["data"]) == 1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "response_format": "url"}, "'url' is not supported"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "n": 9}, "at most 8"),
        ({"prompt": ""}, "prompt is empty"),
        ({"n": 1}, "prompt: Field required"),
    ],
)
async def test_openai_route_refuses_what_it_cannot_do(
    engine: FakeEngine, body: dict[str, Any], needle: str
) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/v1/images/generations", json=body)
    assert response.status_code == 422
    assert needle in error_of(response)["message"]


# -- every bad input ----------------------------------------------------------------------------

BAD_INPUTS = [
    # wrong types (no coercion: "2" is not 2)
    ({"prompt": 5}, "prompt", "valid string"),
    ({"prompt": "x", "n": "2"}, "n", "valid integer"),
    ({"prompt": "x", "n": 2.0}, "n", "valid integer"),
    ({"prompt": "x", "n": True}, "n", "valid integer"),
    ({"prompt": "x", "seed": "7"}, "seed", "valid integer"),
    ({"prompt": "x", "size": 512}, "size", "valid string"),
    ({"prompt": ["a", "b"]}, "prompt", "valid string"),
    # missing or empty prompt
    ({}, "prompt", "Field required"),
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "   \n"}, "prompt", "prompt is empty"),
    # n out of range
    ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "x", "n": -3}, "n", "greater than or equal to 1"),
    ({"prompt": "x", "n": 9}, "n", "at most 8 images"),
    # bad sizes
    ({"prompt": "x", "size": "big"}, "size", "not WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "64"}, "size", "not WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "64x-64"}, "size", "not WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "0x64"}, "size", "width is 0 px"),
    ({"prompt": "x", "size": "64x2048"}, "size", "height is 2048 px; this server accepts 64 to 128"),
    ({"prompt": "x", "size": "32x64"}, "size", "width is 32 px"),
    ({"prompt": "x", "size": "72x64"}, "size", "width 72 is not a multiple of 16"),  # the model's own rule
    ({"prompt": "x", "width": 64}, "body", "give both width and height"),
    ({"prompt": "x", "size": "64x64", "width": 64, "height": 64}, "body", "either size or width"),
    ({"prompt": "x", "width": 0, "height": 64}, "width", "greater than or equal to 1"),
    # output format and quality
    ({"prompt": "x", "output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ({"prompt": "x", "output_format": "PNG"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ({"prompt": "x", "output_compression": 101}, "output_compression", "less than or equal to 100"),
    # seeds
    ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "seed": 2**32}, "seed", "less than or equal to 4294967295"),
    # a typo is an error, not a silently ignored field
    ({"prompt": "x", "sede": 7}, "sede", "unknown field"),
    # prompt length in characters (max_prompt_chars=200 below)
    ({"prompt": "x" * 201}, "prompt", "201 characters"),
]


@pytest.mark.parametrize(("body", "param", "needle"), BAD_INPUTS, ids=[str(b[0])[:40] for b in BAD_INPUTS])
async def test_bad_input_is_a_422_naming_the_problem(
    engine: FakeEngine, body: dict[str, Any], param: str | None, needle: str
) -> None:
    async with serve(engine, max_prompt_chars=200) as (client, app):
        response = await client.post("/generate", json=body)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid"
    if param is not None:
        assert error["param"] == param
    assert engine.batches == []  # nothing bad is ever queued
    rejected = [
        line
        for line in metrics.splitlines()
        if line.startswith("tiue_requests_rejected_total") and 'reason="invalid"' in line
    ]
    assert sum(float(line.split()[-1]) for line in rejected) == 1.0  # model="" when the body named none yet


async def test_several_problems_are_reported_together(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", json={"prompt": 1, "n": "x", "output_format": "gif"})
    message = error_of(response)["message"]
    assert all(field in message for field in ("prompt:", "n:", "output_format:"))


@pytest.mark.parametrize(
    ("content", "headers", "status", "needle"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"", {"content-type": "application/json"}, 422, "JSON object body is required"),
        (b"[1, 2]", {"content-type": "application/json"}, 422, "must be a JSON object"),
        (b'{"prompt": "x"}', {}, 415, "Content-Type: application/json"),
        (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
    ],
)
async def test_a_body_that_is_not_a_json_object(
    engine: FakeEngine, content: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert needle in error_of(response)["message"]


async def test_oversize_body_is_413_by_content_length(engine: FakeEngine) -> None:
    async with serve(engine, max_body_bytes=2048) as (client, _app):
        response = await client.post("/generate", json={"prompt": "x" * 4096})
    assert response.status_code == 413
    assert "2048 bytes" in error_of(response)["message"]


async def test_oversize_body_is_413_when_streamed_without_a_length(engine: FakeEngine) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(8):
            yield b"x" * 512

    async with serve(engine, max_body_bytes=2048) as (client, _app):
        response = await client.post(
            "/generate", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413


async def test_unknown_route_and_method_keep_the_error_shape(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        missing = await client.get("/nope")
        wrong_method = await client.get("/generate")
    assert missing.status_code == 404 and error_of(missing)["message"] == "Not Found"
    assert wrong_method.status_code == 405


# -- prompts longer than the text encoder's window --------------------------------------------------

LONG_PROMPT = "one two three four five six seven eight nine ten"  # 12 fake tokens; the window is 8


async def test_long_prompt_is_truncated_and_said_so(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        response = await client.post("/generate", json={"prompt": LONG_PROMPT})
        raw = await client.post("/generate", json={"prompt": LONG_PROMPT}, headers={"Accept": "image/*"})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    (warning,) = response.json()["warnings"]
    assert "12 tokens" in warning and "reads 8" in warning and "last 4 tokens were ignored" in warning
    assert response.headers["x-warning"] == warning
    assert raw.headers["x-warning"] == warning
    assert "tiue_prompts_truncated_total 2.0" in metrics


async def test_long_prompt_is_refused_under_the_reject_policy(engine: FakeEngine) -> None:
    async with serve(engine, prompt_policy="reject") as (client, _app):
        response = await client.post("/generate", json={"prompt": LONG_PROMPT})
    assert response.status_code == 422
    assert "shorten it" in error_of(response)["message"]


# -- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "needle"),
    [
        (None, "an API key is required"),
        ("Bearer wrong", "not valid"),
        ("Bearer ", "must be 'Bearer <key>'"),
        ("Basic c2VjcmV0", "must be 'Bearer <key>'"),
        ("secret-1", "must be 'Bearer <key>'"),
    ],
)
async def test_missing_or_bad_key_is_401(engine: FakeEngine, authorization: str | None, needle: str) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with serve(engine, api_keys="secret-1, secret-2") as (client, _app):
        response = await client.post("/generate", json=GOOD, headers=headers)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert needle in error_of(response)["message"]
    assert 'tiue_requests_rejected_total{model="",reason="unauthorized"} 1.0' in metrics


async def test_any_configured_key_works_and_health_stays_open(engine: FakeEngine) -> None:
    async with serve(engine, api_keys="secret-1,secret-2") as (client, _app):
        for key in ("secret-1", "secret-2"):
            response = await client.post("/generate", json=GOOD, headers={"Authorization": f"bearer {key}"})
            assert response.status_code == 200
        openai = await client.post(
            "/v1/images/generations", json=GOOD, headers={"Authorization": "Bearer secret-2"}
        )
        assert openai.status_code == 200
        for path in ("/livez", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200


async def test_auth_comes_before_body_validation(engine: FakeEngine) -> None:
    async with serve(engine, api_keys="secret-1") as (client, _app):
        response = await client.post("/generate", json={"prompt": ""})
    assert response.status_code == 401


# -- the queue: full, deadlines, failures, disconnects ------------------------------------------------


async def test_full_queue_is_429_with_retry_after(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with serve(engine, max_batch_size=1, queue_size=2, max_n=2) as (client, app):
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()
        queued = asyncio.create_task(client.post("/generate", json={**GOOD, "n": 2, "seed": 2}))
        await wait_until(lambda: app.state.tiue.batcher.pending_images == 2)
        refused = await client.post("/generate", json=GOOD)
        engine.gate.set()
        assert (await running).status_code == 200
        assert (await queued).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue is full" in error_of(refused)["message"]
    # Refused before its body was read: no model chosen yet.
    assert 'tiue_requests_rejected_total{model="",reason="queue_full"} 1.0' in metrics


async def test_request_past_its_deadline_is_504_and_never_computed(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with serve(engine, max_batch_size=1, request_timeout_s=0.3) as (client, _app):
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()
        late = await client.post("/generate", json={**GOOD, "seed": 2})
        engine.gate.set()
        await running
        after = await client.post("/generate", json={**GOOD, "seed": 3})
        metrics = (await client.get("/metrics")).text
    assert late.status_code == 504
    assert "timed out" in error_of(late)["message"]
    assert after.status_code == 200
    assert [r.seed for batch in engine.batches for r in batch] == [1, 3]
    assert 'tiue_requests_rejected_total{model="fake-tiue",reason="timeout"}' in metrics


async def test_engine_failure_is_500_for_its_batch_and_the_service_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FakeEngine(fail=lambda batch: any(r.prompt == "boom" for r in batch))
    with caplog.at_level(logging.ERROR):
        async with serve(engine) as (client, _app):
            failed = await client.post("/generate", json={"prompt": "boom"})
            fine = await client.post("/generate", json=GOOD)
            ready = await client.get("/readyz")
    assert failed.status_code == 500
    message = error_of(failed)["message"]
    assert "image generation failed" in message and "caught fire" not in message  # no internals leak
    assert fine.status_code == 200 and ready.status_code == 200
    assert "caught fire" in caplog.text


async def test_unexpected_error_is_a_plain_500_with_the_traceback_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BrokenTokenizer(FakeEngine):
        def count_tokens(self, prompt: str) -> int:
            raise KeyError("tokenizer state went missing")

    with caplog.at_level(logging.ERROR):
        async with serve(BrokenTokenizer()) as (client, _app):
            response = await client.post("/generate", json=GOOD)
            alive = await client.get("/livez")
    assert response.status_code == 500
    assert error_of(response)["message"] == "internal server error"
    assert "Traceback" in caplog.text and "tokenizer state went missing" in caplog.text
    assert alive.status_code == 200


async def test_client_that_disconnects_is_dropped_before_its_batch_runs(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with serve(engine, max_batch_size=1) as (client, app):
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()

        disconnect = asyncio.Event()
        sent: list[dict[str, Any]] = []
        body = b'{"prompt": "x", "seed": 2}'
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is not None:
                return message
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/generate",
            "raw_path": b"/generate",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"tiue.test")],
            "client": ("127.0.0.1", 1),
            "server": ("tiue.test", 80),
            "state": {},
        }
        gone = asyncio.create_task(app(scope, receive, send))
        await wait_until(lambda: app.state.tiue.batcher.pending_images == 1)
        disconnect.set()
        await asyncio.wait_for(gone, 5)
        assert app.state.tiue.batcher.pending_images == 0
        engine.gate.set()
        assert (await running).status_code == 200
        after = await client.post("/generate", json={**GOOD, "seed": 3})
        metrics = (await client.get("/metrics")).text
    assert after.status_code == 200
    assert [r.seed for batch in engine.batches for r in batch] == [1, 3]  # seed 2 never computed
    assert 'tiue_requests_rejected_total{model="fake-tiue",reason="cancelled"} 1.0' in metrics


# -- readiness and metrics --------------------------------------------------------------------------


async def test_metrics_cover_the_request_path(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        await client.post("/generate", json={**GOOD, "n": 3})
        await client.post("/generate", json={"prompt": ""})
        text = (await client.get("/metrics")).text
    for line in (
        'tiue_model_info{backend="torch",device="cpu",model="fake-tiue",precision="fp32"} 1.0',
        "tiue_ready 1.0",
        'tiue_images_generated_total{model="fake-tiue"} 3.0',
        'tiue_batch_size_images_sum{model="fake-tiue"} 3.0',
        "tiue_queue_depth 0.0",
        "tiue_in_flight_requests 0.0",
        'tiue_request_duration_seconds_count{model="fake-tiue",route="/generate",status="200"} 1.0',
        'tiue_request_duration_seconds_count{model="",route="/generate",status="422"} 1.0',
        'tiue_stage_duration_seconds_count{model="fake-tiue",stage="image_encode"} 3.0',
        'tiue_stage_duration_seconds_count{model="fake-tiue",stage="denoise"} 1.0',
        'tiue_queue_wait_seconds_count{model="fake-tiue"} 1.0',
    ):
        assert line in text, line


async def test_metrics_label_unknown_paths_as_other(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        await client.get("/wp-admin/secret")
        text = (await client.get("/metrics")).text
    assert 'route="other",status="404"' in text
    assert "wp-admin" not in text


async def test_in_flight_gauge_counts_waiting_requests(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with serve(engine) as (client, app):
        pending = [asyncio.create_task(client.post("/generate", json={**GOOD, "seed": i})) for i in range(2)]
        await engine.wait_entered()
        await wait_until(lambda: app.state.tiue.metrics.in_flight._value.get() == 2)
        engine.gate.set()
        await asyncio.gather(*pending)
        assert app.state.tiue.metrics.in_flight._value.get() == 0


async def test_readyz_says_busy_while_one_batch_outlasts_the_request_timeout(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with serve(engine, request_timeout_s=0.3, max_request_s=0.3) as (client, app):
        pending = asyncio.create_task(client.post("/generate", json={"prompt": "x"}))
        await engine.wait_entered()
        assert (await client.get("/readyz")).status_code == 200  # busy, but not for long yet
        await asyncio.sleep(0.4)
        busy = await client.get("/readyz")
        assert busy.status_code == 503 and busy.json()["status"] == "busy", busy.text
        assert "longer than the 0.3 s request timeout" in busy.json()["detail"]
        engine.gate.set()
        assert (await pending).status_code == 504  # its own client had given up meanwhile
        await wait_until(lambda: app.state.tiue.worker.busy_since is None)
        ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["queued_seconds"] == 0
