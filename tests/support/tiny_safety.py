"""A tiny random-init safety checker (diffusers' StableDiffusionSafetyChecker on a small CLIP vision tower)
saved into a pipeline folder, and the means to aim its concepts at known images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

CROP = 32  # the feature extractor's crop: the tiny tower's image size
NEVER = 2.0  # a threshold no cosine similarity reaches


def add_safety_checker(model_dir: Path, seed: int = 3) -> None:
    """`safety_checker/` and `feature_extractor/` in `model_dir`; no concept fires until aimed."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": CROP,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(NEVER)
        checker.special_care_embeds_weights.fill_(NEVER)
    checker.save_pretrained(model_dir / "safety_checker", safe_serialization=True)
    extractor = CLIPImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})
    extractor.save_pretrained(model_dir / "feature_extractor")


def _load(model_dir: Path) -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    checker = StableDiffusionSafetyChecker.from_pretrained(model_dir / "safety_checker").eval()
    return checker, CLIPImageProcessor.from_pretrained(model_dir / "feature_extractor")


@torch.no_grad()
def image_embeddings(model_dir: Path, pixels: Sequence[np.ndarray]) -> np.ndarray:
    """The checker's normalised image embeddings of uint8 RGB images, one row each."""
    checker, extractor = _load(model_dir)
    clip_input = extractor(list(pixels), return_tensors="pt").pixel_values
    embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
    return torch.nn.functional.normalize(embeds).numpy()


def aim(
    model_dir: Path,
    concepts: Sequence[tuple[np.ndarray, float]],
    special: Sequence[tuple[np.ndarray, float]] = (),
) -> None:
    """Set the first concepts (and special-care concepts) to (embedding, threshold); the rest never fire."""
    checker, _ = _load(model_dir)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(NEVER)
        checker.special_care_embeds_weights.fill_(NEVER)
        for embeds, weights, rows in (
            (checker.concept_embeds, checker.concept_embeds_weights, concepts),
            (checker.special_care_embeds, checker.special_care_embeds_weights, special),
        ):
            for index, (embedding, threshold) in enumerate(rows):
                embeds[index] = torch.from_numpy(embedding)
                weights[index] = threshold
    checker.save_pretrained(model_dir / "safety_checker", safe_serialization=True)


PROMPT, SIZE, SEEDS = "a red circle", 64, range(6)  # the images the aimed checker knows
FLAGGED_SEED = 3  # flagged whatever the moderation
CARE_SEED = 5  # near a special-care concept: flagged with moderation auto, not with low


def _direction(embeddings: np.ndarray, index: int) -> tuple[np.ndarray, float, float]:
    """A unit vector that separates image `index` from the others: (vector, its cosine with the image,
    the largest cosine with another)."""
    others = np.delete(embeddings, index, axis=0)
    vector = embeddings[index] - others.mean(axis=0)
    vector = vector / np.linalg.norm(vector)
    return vector, float(embeddings[index] @ vector), float((others @ vector).max())


def add_aimed_safety_checker(model_dir: Path) -> None:
    """A checker in `model_dir` that flags FLAGGED_SEED's image (PROMPT, SIZE, the full decoder) always,
    CARE_SEED's only with the special-care adjustment (moderation auto), and none of the other SEEDS."""
    from engine.config import EngineConfig
    from engine.pipeline import load_pipeline
    from engine.types import GenerationRequest, SafetyCheck

    add_safety_checker(model_dir)
    pipeline = load_pipeline(EngineConfig(model_dir=model_dir, safety_checker=SafetyCheck.OFF))
    result = pipeline.generate([GenerationRequest(PROMPT, seed, SIZE, SIZE) for seed in SEEDS])
    embeddings = image_embeddings(model_dir, [image.pixels for image in result.images])
    flagged, own, other = _direction(embeddings, list(SEEDS).index(FLAGGED_SEED))
    care, care_own, care_other = _direction(embeddings, list(SEEDS).index(CARE_SEED))
    assert min(own - other, care_own - care_other) > 0.01, "the images are too alike to aim at one"
    aim(
        model_dir,
        concepts=[(flagged, (own + other) / 2), (care, care_own + 0.005)],  # care: -0.005, +0.01 with care
        special=[(care, (care_own + care_other) / 2)],
    )
