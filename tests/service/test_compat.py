"""Browsers and tools written for other image APIs: CORS preflights over a real uvicorn, model aliases
(the official `openai` client asking for `gpt-image-1`), a warning for each parameter accepted but not
honoured, and the docs switch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import openai
import pytest
from fakes import FakeEngine, serve
from test_uvicorn_e2e import uvicorn_serving

from service.app import create_app
from service.cli import build_parser, main, serve_settings
from service.settings import Settings

ORIGIN = "https://app.example.com"
KEY = "compat-key"
ROUTE = "/v1/images/generations"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}

# -- CORS ---------------------------------------------------------------------------------------


async def test_a_preflight_passes_auth_and_the_body_limit_and_the_answer_is_readable(
    engine: FakeEngine,
) -> None:
    settings: dict[str, Any] = {"cors_origins": [ORIGIN, "https://other.example"], "api_keys": [KEY]}
    async with uvicorn_serving(engine, **settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        preflight = await client.options(ROUTE, headers=PREFLIGHT)
        stranger = await client.options(ROUTE, headers={**PREFLIGHT, "Origin": "https://evil.example"})
        keyless = await client.post(ROUTE, json={"prompt": "x"}, headers={"Origin": ORIGIN})
        answered = await client.post(
            ROUTE, json={"prompt": "x"}, headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
        )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= set(
        preflight.headers["access-control-allow-headers"].lower().replace(" ", "").split(",")
    )
    assert "x-request-id" in preflight.headers  # the outermost middleware saw it (logged, counted)
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    assert keyless.status_code == 401  # the key is still required for the request itself
    assert keyless.headers["access-control-allow-origin"] == ORIGIN  # and the page can read why
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == ORIGIN
    exposed = answered.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "x-warning" in exposed


async def test_without_origins_there_is_no_cors(engine: FakeEngine) -> None:
    async with uvicorn_serving(engine) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        preflight = await client.options(ROUTE, headers=PREFLIGHT)
        answered = await client.post(ROUTE, json={"prompt": "x"}, headers={"Origin": ORIGIN})
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in answered.headers


def test_origins_are_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIUE_CORS_ORIGINS", f"{ORIGIN}/, http://localhost:5173 ,")
    assert Settings().cors_origins == [ORIGIN, "http://localhost:5173"]
    assert Settings(cors_origins="*").cors_origins == ["*"]


# -- model aliases ------------------------------------------------------------------------------


async def test_the_openai_client_asks_for_an_alias(engine: FakeEngine) -> None:
    aliases = "gpt-image-1=fake-tiue,dall-e-3=fake-tiue"
    async with (
        uvicorn_serving(engine, model_aliases=aliases) as (url, _app),
        httpx.AsyncClient(base_url=url) as http,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        listed = [model async for model in client.models.list()]
        one = await client.models.retrieve("dall-e-3")
        images = await client.images.generate(model="gpt-image-1", prompt="a red circle", size="64x64")
        ours = await http.post("/generate", json={"prompt": "a red circle", "model": "dall-e-3"})
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("dall-e-2")
    assert [model.id for model in listed] == ["fake-tiue", "gpt-image-1", "dall-e-3"]
    assert [(model.model_extra or {}).get("alias_of") for model in listed] == [None, "fake-tiue", "fake-tiue"]
    assert [(model.model_extra or {})["default"] for model in listed] == [True, False, False]
    assert one.id == "dall-e-3" and (one.model_extra or {})["alias_of"] == "fake-tiue"
    assert images.data is not None and len(images.data) == 1 and images.data[0].b64_json
    assert (images.model_extra or {})["model"] == "fake-tiue"  # the model that made the images
    assert ours.status_code == 200 and ours.json()["model"] == "fake-tiue"
    assert "gpt-image-1" in str(missing.value)  # the 404 lists the names a client may use


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        (
            "gpt-image-1=sd99",
            "model_aliases: 'gpt-image-1' names 'sd99', which is not a served model (sd15, sd21)",
        ),
        ("sd21=sd15", "model_aliases: 'sd21' is the name of a served model, not an alias"),
        ("gpt-image-1", "'gpt-image-1' is not ALIAS=MODEL"),
        ("a=sd15,a=sd21", "the alias 'a' is given twice"),
        ("a b=sd15", "the alias 'a b' is not 1-64 letters"),
    ],
)
def test_bad_aliases_fail_at_start_in_one_line(
    aliases: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIUE_MODELS", "sd15=/m/a,sd21=/m/b")
    monkeypatch.setenv("TIUE_MODEL_ALIASES", aliases)
    assert main(["serve"]) == 2
    assert message in capsys.readouterr().err


async def test_an_alias_of_a_model_that_is_not_loaded_fails_the_start(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    failures: list[BaseException] = []
    settings = Settings(model_aliases="gpt-image-1=default")  # the one model is named fake-tiue
    app = create_app(settings, pipeline_factory=lambda: engine, on_fatal=failures.append)
    with caplog.at_level(logging.ERROR, logger="service.state"):
        async with app.router.lifespan_context(app):
            async with asyncio.timeout(10):
                while app.state.tiue.failure is None:
                    await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                ready = await client.get("/readyz")
    expected = "model_aliases: 'gpt-image-1' names 'default', which is not a served model (fake-tiue)"
    assert ready.status_code == 503 and ready.json()["detail"] == expected
    messages = [r.getMessage() for r in caplog.records if r.name == "service.state"]
    assert len(failures) == 1 and messages == [expected]


def test_the_serve_flag_takes_aliases() -> None:
    settings = serve_settings(build_parser().parse_args(["serve", "--model-aliases", "gpt-image-1=default"]))
    assert settings.model_aliases == {"gpt-image-1": "default"}


# -- parameters accepted and ignored ------------------------------------------------------------


async def test_each_ignored_openai_parameter_is_named_in_warnings(engine: FakeEngine) -> None:
    body = {
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "style": "vivid",
        "user": "someone",
        "quality": "hd",
        "background": "opaque",  # honoured: the images are opaque
        "output_compression": 50,  # a png ignores it
        "some_future_field": True,
        "bad\r\nname": 1,  # never echoed into a header
    }
    async with uvicorn_serving(engine) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        response = await client.post(ROUTE, json=body)
        quiet = await client.post(ROUTE, json={"prompt": "x", "quality": "auto", "background": "auto"})
        low = await client.post(ROUTE, json={"prompt": "x", "quality": "low"})
        jpeg = await client.post(
            ROUTE, json={"prompt": "x", "output_format": "jpeg", "output_compression": 5}
        )
        ours = await client.post("/generate", json={"prompt": "x", "output_compression": 50})
    assert response.status_code == 200, response.text
    warnings = response.json()["warnings"]
    assert warnings == [
        "quality 'hd' was ignored: only 'low' (the tiny decoder) changes anything here",
        "style is accepted for compatibility and ignored",
        "user is accepted for compatibility and ignored",
        "negative_prompt is not supported by this server and was ignored",
        "some_future_field is not supported by this server and was ignored",
        "1 other unknown field was ignored",
        "output_compression applies to jpeg and webp; ignored for png",
    ]
    assert response.headers["x-warning"] == " | ".join(warnings)
    assert quiet.json()["warnings"] == [] and "x-warning" not in quiet.headers
    assert low.json()["warnings"] == ["quality 'low' was ignored: model fake-tiue has no tiny decoder"]
    assert jpeg.json()["warnings"] == []
    assert ours.json()["warnings"] == ["output_compression applies to jpeg and webp; ignored for png"]


# -- docs ---------------------------------------------------------------------------------------


async def test_the_docs_are_served_from_the_package_or_not_at_all(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        page = await client.get("/docs")
        script = await client.get("/static/swagger-ui-bundle.js")
        schema = await client.get("/openapi.json")
    async with serve(engine, docs=False) as (client, _app):
        off = [(await client.get(path)).status_code for path in ("/docs", "/static/swagger-ui-bundle.js")]
    assert page.status_code == 200 and 'src="static/swagger-ui-bundle.js"' in page.text
    assert "cdn" not in page.text.lower() and "default-src 'none'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text
    assert schema.status_code == 200  # the schema itself stays: clients generate code from it
    assert off == [404, 404]
