"""The shipped default model's card (distill.json) says what it was trained on, the engine reads it, and
its tiny decoder's config loads without a warning into the same decoder."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from transformers import CLIPTokenizer

from distill.domain import IMAGE_SIZE, WORDS
from distill.ship import model_card
from distill.tiny_decoder import drop_unexpected_config
from engine.card import read_card, unknown_words
from engine.loading import default_model_dir

MODEL = default_model_dir()


def test_the_card_names_the_training_size_and_every_caption_word() -> None:
    card = json.loads((MODEL / "distill.json").read_text())
    assert card == model_card(card["variant"])  # what `distill ship` writes today
    read = read_card(MODEL)
    assert read.trained_sizes == ((IMAGE_SIZE, IMAGE_SIZE),)
    assert read.vocabulary == WORDS


def test_each_vocabulary_word_is_one_token_of_the_shipped_tokenizer() -> None:
    tokenizer = CLIPTokenizer.from_pretrained(MODEL / "tokenizer", local_files_only=True)
    for word in read_card(MODEL).vocabulary or ():
        assert len(tokenizer(word).input_ids) == 3, word  # BOS, the word, EOS
    assert len(tokenizer("star").input_ids) > 3  # a word outside it falls apart into bytes


@contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """What diffusers warns, heard on its own logger (before the service's log handler sees it)."""
    heard: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
    library = logging.getLogger("diffusers")
    library.addHandler(handler)
    try:
        yield heard
    finally:
        library.removeHandler(handler)


def test_the_tiny_decoder_loads_without_a_warning_and_decodes_as_before(tmp_path: Path) -> None:
    shipped = MODEL / "vae_tiny"
    # The config as AutoencoderTiny.save_pretrained wrote it: with the key its loader warns about.
    saved = tmp_path / "as_saved"
    shutil.copytree(shipped, saved)
    config = json.loads((saved / "config.json").read_text())
    config["block_out_channels"] = config["decoder_block_out_channels"]
    (saved / "config.json").write_text(json.dumps(config))

    with diffusers_warnings() as heard:
        before = AutoencoderTiny.from_pretrained(saved, local_files_only=True).eval()
    assert any("block_out_channels" in line for line in heard), heard  # what users saw at every start
    with diffusers_warnings() as heard:
        after = AutoencoderTiny.from_pretrained(shipped, local_files_only=True).eval()
    assert heard == []
    assert after.config.block_out_channels == before.config.block_out_channels  # set by the model itself

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(before.decode(latents).sample, after.decode(latents).sample)

    drop_unexpected_config(saved / "config.json")  # what shipping does to a freshly trained decoder
    assert json.loads((saved / "config.json").read_text()) == json.loads(
        (shipped / "config.json").read_text()
    )


def test_the_docs_example_prompts_are_words_the_default_model_knows() -> None:
    """The examples run against the default model (docs/models.md's are for real checkpoints)."""
    root = Path(__file__).resolve().parents[2]
    prompt = re.compile(r'"prompt":\s*"([^"]+)"|prompt="([^"]+)"|tiue generate "([^"]+)"')
    vocabulary = read_card(MODEL).vocabulary
    found = {}
    for doc in ("README.md", "docs/api.md", "docs/deploy.md"):
        for match in prompt.finditer((root / doc).read_text()):
            text = next(group for group in match.groups() if group)
            found[(doc, text)] = unknown_words(text, vocabulary)
    assert len(found) >= 5
    assert {key: words for key, words in found.items() if words} == {}
