"""Stage `ship`: assemble the chosen student as a standard SD pipeline folder (the embedded default
model), copy the judge beside it, and draw the README grid with the shipped folder itself."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw

from distill.common import need
from distill.domain import IMAGE_SIZE, WORDS
from distill.models import build_scheduler
from distill.onepass import one_pass
from distill.sampling import decode, initial_noise
from distill.teacher import load_teacher
from distill.text import encode
from distill.tokenizer import load_tokenizer
from distill.vae import load_vae

log = logging.getLogger(__name__)

JUDGE_PATH = Path(__file__).resolve().parent / "judge.safetensors"  # the judge of the shipped model
GRID_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a purple cross on a yellow background",
    "a large white circle in the center on a red background",
    "a small blue square on the left on a green background",
    "a large black triangle at the top on a purple background",
    "a small red cross at the bottom on a white background",
    "a large green circle on the right on a black background",
    "a small yellow triangle on the right on a blue background",
    "a blue cross in the center on a yellow background",
    "a purple square at the top on a green background",
)
GRID_SEEDS = (0, 1, 2, 3)


def model_card(variant: str) -> dict[str, object]:
    """`distill.json`: how the model was made, and what the engine reads to say what it draws well
    (engine.card: the size it was trained at, the words its captions used)."""
    return {
        "variant": variant,
        "steps": 4,
        "guidance": "distilled (none at inference)",
        "trained_sizes": [f"{IMAGE_SIZE}x{IMAGE_SIZE}"],
        "vocabulary": list(WORDS),
    }


def judge_beside(out: Path) -> Path:
    """Where the judge goes when only the model folder is named: `<out>-judge.safetensors`."""
    return out.with_name(out.name + "-judge.safetensors")


def ship(workdir: Path, variant: str, out: Path, judge_out: Path) -> Path:
    """Write the variant's student as a pipeline folder at `out` and the judge at `judge_out`: only
    where the caller says, never into an installed package."""
    unet = UNet2DConditionModel.from_pretrained(
        str(need(workdir / "student" / variant / "unet", "student")), local_files_only=True
    )
    _, text_encoder = load_teacher(workdir)
    pipe = StableDiffusionPipeline(
        vae=load_vae(workdir),
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(workdir / "tokenizer"),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the slow CLIPTokenizer (transformers 4) reads these
        shutil.copyfile(workdir / "tokenizer" / name, out / "tokenizer" / name)
    (out / "distill.json").write_text(json.dumps(model_card(variant), indent=2))
    judge_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(need(workdir / "judge" / "judge.safetensors", "judge"), judge_out)
    log.info("shipped %s student to %s", variant, out)
    return out


@torch.no_grad()
def generate(model_dir: Path, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """One-pass images from a shipped pipeline folder (the same math the engine serves)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, safety_checker=None)
    denoise = one_pass(pipe.unet.eval(), pipe.scheduler.config, steps=4)
    cond = encode(pipe.text_encoder, pipe.tokenizer, prompts)
    z0, _ = denoise(initial_noise(seeds, size=pipe.unet.config.sample_size), cond)
    return decode(pipe.vae, z0)


def draw_grid(model_dir: Path, path: Path, scale: int = 2) -> Path:
    prompts = [p for p in GRID_PROMPTS for _ in GRID_SEEDS]
    images = generate(model_dir, prompts, [s for _ in GRID_PROMPTS for s in GRID_SEEDS])
    cell, label_w, n = 64 * scale, 330, len(GRID_SEEDS)
    grid = Image.new("RGB", (label_w + n * (cell + 4), len(GRID_PROMPTS) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(GRID_PROMPTS):
        y = r * (cell + 4)
        draw.text((6, y + cell // 2 - 6), prompt, fill=(0, 0, 0))
        for c in range(n):
            img = Image.fromarray(images[r * n + c]).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(img, (label_w + c * (cell + 4), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
