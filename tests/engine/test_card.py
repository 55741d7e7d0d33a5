"""engine.card: what a model folder says it draws well, and the warnings a request outside it gets."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine.card import ModelCard, fit_warnings, read_card, unknown_words
from engine.errors import ModelLoadError
from engine.types import ModelInfo

INFO = ModelInfo(
    name="shapes",
    backend="torch",
    precision="fp32",
    device="cpu",
    steps=4,
    max_prompt_tokens=16,
    size_multiple=16,
    default_size=64,
    trained_sizes=((64, 64),),
    vocabulary=("a", "red", "circle", "on", "blue", "background"),
)


def test_unknown_words_are_named_once_in_order_ignoring_case_and_punctuation() -> None:
    vocabulary = INFO.vocabulary
    assert unknown_words("A red circle, on a BLUE background.", vocabulary) == []
    assert unknown_words("a Star, a heart and a star!", vocabulary) == ["star", "heart", "and"]
    assert unknown_words("a red circle 2x", vocabulary) == ["2", "x"]
    assert unknown_words("anything at all", None) == []  # vocabulary not known: nothing to say


def test_a_request_inside_the_card_gets_no_warning() -> None:
    assert fit_warnings(INFO, "a red circle on a blue background", 64, 64) == []


def test_unknown_words_and_an_untrained_size_each_get_a_warning() -> None:
    words, size = fit_warnings(INFO, "a photo of a cat", 128, 64)
    assert "does not know the words 'photo', 'of', 'cat'" in words
    assert "trained at 64x64; at 128x64 it draws worse" in size
    unknown = replace(INFO, vocabulary=None, trained_sizes=())
    assert fit_warnings(unknown, "a photo of a cat", 128, 64) == []


def test_a_folder_without_a_card_states_nothing(tmp_path: Path) -> None:
    assert read_card(tmp_path) == ModelCard()
    (tmp_path / "distill.json").write_text('{"variant": "regress"}')
    assert read_card(tmp_path) == ModelCard()


def test_a_card_is_read(tmp_path: Path) -> None:
    (tmp_path / "distill.json").write_text(
        json.dumps({"trained_sizes": ["64x64", "96x64"], "vocabulary": ["Red", "circle"]})
    )
    assert read_card(tmp_path) == ModelCard(((64, 64), (96, 64)), ("red", "circle"))


@pytest.mark.parametrize("text", ['{"trained_sizes": ["big"]}', "not json", '{"trained_sizes": 64}'])
def test_a_broken_card_fails_the_load_naming_the_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "distill.json").write_text(text)
    with pytest.raises(ModelLoadError, match=f"cannot read the model card {tmp_path / 'distill.json'}"):
        read_card(tmp_path)


def test_the_pipeline_reports_the_card_or_its_native_size(tiny_model_dir: Path) -> None:
    from engine.config import EngineConfig
    from engine.pipeline import load_pipeline

    default = load_pipeline(EngineConfig()).info
    assert default.trained_sizes == ((64, 64),) and default.vocabulary is not None
    assert {"circle", "red", "background"} <= set(default.vocabulary)
    plain = load_pipeline(EngineConfig(model_dir=tiny_model_dir)).info  # a folder without a card
    native = plain.default_size
    assert plain.trained_sizes == ((native, native),) and plain.vocabulary is None
