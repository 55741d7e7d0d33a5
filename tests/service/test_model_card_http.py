"""What a model draws well, over HTTP: /v1/models lists its trained sizes and vocabulary, and a request
outside them is served with a warning naming what the model will likely get wrong."""

from __future__ import annotations

from dataclasses import replace

from fakes import FAKE_INFO, FakeEngine, serve

SHAPES = replace(
    FAKE_INFO,
    max_prompt_tokens=16,
    trained_sizes=((64, 64),),
    vocabulary=("a", "red", "circle", "on", "blue", "background"),
)


async def test_models_list_trained_sizes_and_vocabulary() -> None:
    engine = FakeEngine()
    engine.info = SHAPES
    async with serve(engine) as (client, _app):
        (model,) = (await client.get("/v1/models")).json()["data"]
    assert model["trained_sizes"] == ["64x64"]
    assert model["vocabulary"] == ["a", "red", "circle", "on", "blue", "background"]


async def test_a_model_that_states_nothing_lists_no_vocabulary(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        (model,) = (await client.get("/v1/models")).json()["data"]
        answer = await client.post("/generate", json={"prompt": "a photo of a cat", "size": "96x64"})
    assert (model["trained_sizes"], model["vocabulary"]) == ([], None)
    assert answer.status_code == 200 and answer.json()["warnings"] == []


async def test_unknown_words_and_an_untrained_size_are_served_with_warnings() -> None:
    engine = FakeEngine()
    engine.info = SHAPES
    async with serve(engine) as (client, _app):
        inside = await client.post("/generate", json={"prompt": "a red circle on a blue background"})
        outside = await client.post("/generate", json={"prompt": "a red star", "size": "128x128"})
        openai = await client.post("/v1/images/generations", json={"prompt": "a heart"})
    assert inside.status_code == 200 and inside.json()["warnings"] == []
    assert "x-warning" not in inside.headers
    assert outside.status_code == 200  # warned, not refused: the images are made
    words, size = outside.json()["warnings"]
    assert "does not know the words 'star'" in words
    assert "trained at 64x64; at 128x128" in size
    assert outside.headers["x-warning"] == f"{words} | {size}"
    assert openai.status_code == 200 and "'heart'" in openai.headers["x-warning"]
