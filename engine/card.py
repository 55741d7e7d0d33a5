"""What a model folder says about what it draws well, beyond its diffusers configs.

An optional `distill.json` in the pipeline folder (the embedded default model has one; `distill ship`
writes it) may name `trained_sizes` (["64x64"]) and `vocabulary` (every word its captions used). A
folder without them: trained at its native size, any vocabulary. Requests outside either still run
(they are valid computations, and a real checkpoint degrades gradually off its training size); the
answer carries a warning saying what the model will likely get wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError
from engine.types import ModelInfo

CARD_FILE = "distill.json"
_WORD = re.compile(r"[^\W\d_]+|\d+")  # a run of letters or of digits; punctuation is not a word
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class ModelCard:
    trained_sizes: tuple[tuple[int, int], ...] = ()  # (width, height); (): not stated
    vocabulary: tuple[str, ...] | None = None  # lower-case words; None: not stated (any words)


def read_card(model_dir: Path) -> ModelCard:
    """The card in `model_dir`, or an empty one; a card that is there but unreadable fails the load."""
    path = model_dir / CARD_FILE
    if not path.is_file():
        return ModelCard()
    try:
        data = json.loads(path.read_text())
        sizes = tuple(_size(text) for text in data.get("trained_sizes", ()))
        words = data.get("vocabulary")
        vocabulary = None if words is None else tuple(str(w).lower() for w in words)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read the model card {path}: {exc}") from exc
    return ModelCard(sizes, vocabulary)


def _size(text: str) -> tuple[int, int]:
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"trained size {text!r} is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def unknown_words(prompt: str, vocabulary: tuple[str, ...] | None) -> list[str]:
    """The prompt's words outside the vocabulary, lower-cased, each once, in order; [] when it is not known."""
    if vocabulary is None:
        return []
    known = set(vocabulary)
    return list(dict.fromkeys(w for w in _WORD.findall(prompt.lower()) if w not in known))


def fit_warnings(info: ModelInfo, prompt: str, width: int, height: int) -> list[str]:
    """What the model will likely get wrong in this request: words it never saw, a size it was not trained at."""
    warnings = []
    model = info.name
    unknown = unknown_words(prompt, info.vocabulary)
    if unknown:
        warnings.append(
            f"model {model} does not know the words {', '.join(repr(w) for w in unknown)}: it was trained on "
            "a small vocabulary (GET /v1/models lists it), so the image will likely ignore them"
        )
    if info.trained_sizes and (width, height) not in info.trained_sizes:
        trained = ", ".join(f"{w}x{h}" for w, h in info.trained_sizes)
        warnings.append(
            f"model {model} was trained at {trained}; at {width}x{height} it draws worse "
            "(repeated or distorted shapes)"
        )
    return warnings
