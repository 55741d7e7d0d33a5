"""The model folder's safety checker: diffusers' `StableDiffusionSafetyChecker` and its CLIP feature extractor.

It runs as the Stable Diffusion pipelines run it (`run_safety_checker`: the decoded images through the
`feature_extractor/` CLIPImageProcessor, then the checker's CLIP vision tower and concept scores), in
torch on the pipeline's device whatever the backend. The scores are the checker's own (`forward`), read
per image so that each request's `moderation` applies; what to do with a flagged image is the caller's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
    cosine_distance,
)

from engine.errors import ModelLoadError
from engine.types import Moderation, SafetyCheck

log = logging.getLogger(__name__)

CHECKER, EXTRACTOR = "safety_checker", "feature_extractor"
SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' `adjustment` once an image is near a special-care concept


class SafetyChecker:
    """Flags images: True where the checker finds a concept above its threshold."""

    def __init__(self, checker: StableDiffusionSafetyChecker, extractor: Any, device: torch.device):
        self.checker = checker
        self.extractor = extractor
        self.device = device
        self.dtype = checker.dtype

    @torch.inference_mode()
    def flags(self, pixels: np.ndarray, moderation: Sequence[Moderation]) -> list[bool]:
        """`pixels`: [B, H, W, 3] uint8 RGB; one flag per image, its request's `moderation` applied."""
        inputs = self.extractor(list(pixels), return_tensors="pt").pixel_values
        clip_input = inputs.to(self.device, self.dtype)
        checker = self.checker
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        special = cosine_distance(embeds, checker.special_care_embeds).cpu().float().numpy()
        concept = cosine_distance(embeds, checker.concept_embeds).cpu().float().numpy()
        special_w = checker.special_care_embeds_weights.cpu().float().numpy()
        concept_w = checker.concept_embeds_weights.cpu().float().numpy()
        # As StableDiffusionSafetyChecker.forward: scores rounded to 3 decimals, > 0 is a hit.
        care = (np.round(special - special_w, 3) > 0).any(axis=1)
        strict = np.array([m is Moderation.AUTO for m in moderation])
        adjustment = np.where(care & strict, SPECIAL_CARE_ADJUSTMENT, 0.0)[:, None]
        hits = np.round(concept - concept_w + adjustment, 3) > 0
        return [bool(hit) for hit in hits.any(axis=1)]


def load_safety_checker(
    model_dir: Path, mode: SafetyCheck, dtype: torch.dtype, device: str | torch.device
) -> SafetyChecker | None:
    """The folder's checker when `mode` asks for it (auto: when `safety_checker/` is there); `on` without
    one fails, naming the folder."""
    mode = SafetyCheck(mode)
    folder, extractor_folder = model_dir / CHECKER, model_dir / EXTRACTOR
    present = (folder / "config.json").is_file()
    if mode is SafetyCheck.OFF or (mode is SafetyCheck.AUTO and not present):
        return None
    if not present:
        raise ModelLoadError(
            f"TIUE_SAFETY_CHECKER=on but {folder} has no safety checker (config.json); "
            "add the model's safety_checker/ and feature_extractor/, or set TIUE_SAFETY_CHECKER=auto or off"
        )
    if not (extractor_folder / "preprocessor_config.json").is_file():
        raise ModelLoadError(
            f"{folder} needs its feature extractor: {extractor_folder}/preprocessor_config.json is missing"
        )
    from transformers import CLIPImageProcessor  # here: without torchvision, importing it logs a notice

    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True
        )
        extractor = CLIPImageProcessor.from_pretrained(extractor_folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the safety checker in {folder}: {exc}") from exc
    checker.to(device).eval().requires_grad_(False)
    log.info("safety checker loaded from %s", folder)
    return SafetyChecker(checker, extractor, torch.device(device))
