"""The model folder's safety checker: loaded as configured, run in the batch as its own stage, flags per
image with each request's moderation, and agrees with diffusers' own checker."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPImageProcessor

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.pipeline import TiUEPipeline, load_pipeline
from engine.types import SAFETY_CHECK, GenerationRequest, Moderation, SafetyCheck
from tests.support.tiny_safety import CARE_SEED, FLAGGED_SEED, PROMPT, SEEDS, SIZE


@pytest.fixture(scope="module")
def pipeline(safety_model_dir: Path) -> TiUEPipeline:
    return load_pipeline(EngineConfig(model_dir=safety_model_dir))


def _requests(moderation: Moderation = Moderation.AUTO) -> list[GenerationRequest]:
    return [GenerationRequest(PROMPT, seed, SIZE, SIZE, moderation=moderation) for seed in SEEDS]


def test_auto_loads_the_folders_checker_and_reports_it(pipeline: TiUEPipeline) -> None:
    assert pipeline.info.safety_checker
    assert pipeline.safety_checker is not None


def test_flagged_images_are_marked_and_blacked_out_in_a_timed_stage(pipeline: TiUEPipeline) -> None:
    result = pipeline.generate(_requests())
    flagged = {image.seed for image in result.images if image.flagged}
    assert flagged == {FLAGGED_SEED, CARE_SEED}
    for image in result.images:
        assert (image.pixels.max() == 0) == image.flagged
    assert result.timings[SAFETY_CHECK] > 0


def test_moderation_low_leaves_out_the_special_care_adjustment(pipeline: TiUEPipeline) -> None:
    mixed = [*_requests(Moderation.LOW), GenerationRequest(PROMPT, CARE_SEED, SIZE, SIZE)]
    result = pipeline.generate(mixed)
    flagged = [image.seed for image in result.images if image.flagged]
    assert flagged == [FLAGGED_SEED, CARE_SEED]  # the low one passes; the same image with auto does not


def test_the_flags_are_diffusers_own(pipeline: TiUEPipeline, safety_model_dir: Path) -> None:
    """What StableDiffusionSafetyChecker.forward says, fed as StableDiffusionPipeline.run_safety_checker feeds it."""
    clean = TiUEPipeline(pipeline.components, pipeline.backend, pipeline.config)  # no checker: raw pixels
    pixels = np.stack([image.pixels for image in clean.generate(_requests()).images])
    checker = StableDiffusionSafetyChecker.from_pretrained(safety_model_dir / "safety_checker").eval()
    extractor = CLIPImageProcessor.from_pretrained(safety_model_dir / "feature_extractor")
    clip_input = extractor(list(pixels), return_tensors="pt").pixel_values
    _, expected = checker(images=torch.from_numpy(pixels.copy()), clip_input=clip_input)
    assert pipeline.safety_checker is not None
    assert pipeline.safety_checker.flags(pixels, [Moderation.AUTO] * len(pixels)) == expected
    assert sum(expected) == 2


def test_off_and_a_folder_without_one_load_no_checker(safety_model_dir: Path, tiny_model_dir: Path) -> None:
    for folder, mode in ((safety_model_dir, SafetyCheck.OFF), (tiny_model_dir, SafetyCheck.AUTO)):
        pipe = load_pipeline(EngineConfig(model_dir=folder, safety_checker=mode))
        assert pipe.safety_checker is None and not pipe.info.safety_checker
        result = pipe.generate(_requests()[:1])
        assert SAFETY_CHECK not in result.timings and not result.images[0].flagged


def test_on_without_a_checker_fails_at_load_naming_the_folder(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=str(tiny_model_dir / "safety_checker")):
        load_pipeline(EngineConfig(model_dir=tiny_model_dir, safety_checker=SafetyCheck.ON))


def test_a_checker_without_its_feature_extractor_fails_at_load(
    safety_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(safety_model_dir, folder)
    shutil.rmtree(folder / "feature_extractor")
    with pytest.raises(ModelLoadError, match="feature_extractor"):
        load_pipeline(EngineConfig(model_dir=folder, safety_checker=SafetyCheck.ON))


def test_tiue_generate_writes_no_flagged_image(
    safety_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    argv = [
        "generate",
        PROMPT,
        "--size",
        f"{SIZE}x{SIZE}",
        "--model",
        str(safety_model_dir),
        "--threads",
        "1",
    ]
    out = tmp_path / "flagged.png"
    assert main([*argv, "--seed", str(FLAGGED_SEED), "--out", str(out)]) == 1
    assert "flagged" in capsys.readouterr().err and not out.exists()
    off = ["--safety-checker", "off", "--seed", str(FLAGGED_SEED), "--out", str(out)]
    assert main([*argv, *off]) == 0 and out.exists()
