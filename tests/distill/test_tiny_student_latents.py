"""The tiny decoder's student latents are drawn from prompts and noise seeds no eval split uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.evaluate import DIVERSITY_PROMPTS, DIVERSITY_SEEDS, SPLITS, diversity_prompts, eval_prompts
from distill.tiny_decoder import student_noise_seeds, student_prompts


def _eval_noise() -> set[int]:
    seeds = {split.noise_base + s for split in SPLITS.values() for s in range(split.seeds)}
    return seeds | {5000 + s for s in range(DIVERSITY_SEEDS)}  # the diversity rows' seeds (evaluate.py)


def test_student_prompts_share_nothing_with_the_eval_splits() -> None:
    held = set(diversity_prompts(DIVERSITY_PROMPTS))
    for split in SPLITS.values():
        held |= set(eval_prompts(split.prompts, split.scene_seed))
    for seed in (0, 1):
        prompts = student_prompts(4096, seed)
        assert len(prompts) == 4096
        assert not set(prompts) & held
        assert len(set(prompts)) > 1000  # drawn scenes (2,240 full captions exist), not one repeated
    assert student_prompts(64, 0) == student_prompts(64, 0)  # cached latents are reproducible
    assert student_prompts(64, 0) != student_prompts(64, 1)


def test_student_noise_seeds_share_nothing_with_the_eval_splits() -> None:
    for seed in (0, 1, 7):
        seeds = student_noise_seeds(4096, seed)
        assert len(set(seeds)) == 4096
        assert not set(seeds) & _eval_noise()
    assert not set(student_noise_seeds(4096, 0)) & set(student_noise_seeds(4096, 1))


def test_training_with_student_latents_runs_and_caches_them(tmp_path: Path) -> None:
    from distill.common import load_checkpoint
    from distill.tiny_decoder import train_tiny_decoder

    torch.manual_seed(0)
    model = train_tiny_decoder(tmp_path, steps=2, batch=4, seed=0, n=8, n_student=4)
    assert (model / "config.json").is_file()
    cached = load_checkpoint(tmp_path / "vae_tiny" / "student_latents.pt")
    assert cached is not None and cached["latents"].shape[0] == 4
    report = json.loads((tmp_path / "vae_tiny" / "train.json").read_text())
    assert report["student_latents"]["share"] == 0.5
